// Command aziot-tpmd is the only process that opens the TPM: it runs as
// user aziottpm, whom the udev rule
//
//	KERNEL=="tpmrm0", SUBSYSTEM=="tpmrm", OWNER="aziottpm", MODE="0660"
//
// grants /dev/tpmrm0, and serves the edge daemon (user iotedge) over a
// Unix socket (internal/tpmservice).
//
//	aziot-tpmd [--tcti T] [--auth-key-index N] [--socket /run/aziot/tpmd.sock]
//	           [--group iotedge] [--config /etc/aziot/config.toml] [--user aziottpm]
//
// Under systemd, run it with User=aziottpm (and SupplementaryGroups=iotedge,
// so that it may give the socket to that group). --user is for other init
// systems: started as root, it drops to that user once the TPM is open and
// the socket exists.
//
// --config takes config.toml or, as the packaged unit gives it,
// /etc/aziot/tpmd/config.toml, which `iotedge config apply` writes: of
// either it reads the [tpm] table and whether provisioning uses the TPM.
// config.toml may hold the device's keys, which only root and user iotedge
// may read, so a service started as aziottpm is given
// /etc/aziot/tpmd/config.toml.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/tpm"
	"github.com/hatchery/hatchery/internal/tpmservice"
	"github.com/pelletier/go-toml/v2"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		slog.Error(err.Error())
		os.Exit(1)
	}
}

// settings are what the daemon runs with.
type settings struct {
	tcti, socket, group, config, user, logLevel string
	// principals are the users who may use the identity key (iotedged's).
	principals   string
	authKeyIndex uint32
	// unused says why there is nothing to serve: the configuration
	// provisions the device without a TPM.
	unused string
}

func parseArgs(args []string, stderr io.Writer) (settings, error) {
	s := settings{authKeyIndex: tpm.DefaultAuthKeyIndex}
	flags := flag.NewFlagSet("aziot-tpmd", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.StringVar(&s.tcti, "tcti", "device", `TPM as a tpm2-tss TCTI string: "device", "device:/dev/tpm0", "swtpm:host=H,port=P" or "mssim:host=H,port=P"; overrides [tpm] tcti of --config`)
	flags.Func("auth-key-index", "the identity key persists at 0x81000000 + N; overrides [tpm] auth_key_index of --config (default 0x100)", func(v string) error {
		n, err := strconv.ParseUint(v, 0, 32)
		if err != nil {
			return fmt.Errorf("%q is not a number", v)
		}
		s.authKeyIndex = uint32(n)
		return nil
	})
	flags.StringVar(&s.socket, "socket", tpmservice.DefaultSocket, "Unix socket to serve on")
	flags.StringVar(&s.group, "group", "iotedge", `group given the socket, whose members may read the TPM's public keys ("" to keep the service's own)`)
	flags.StringVar(&s.principals, "principals", "iotedge", "users, comma-separated, who may import into the identity key and sign with it, besides root and the service's own user: the device's identity is theirs")
	flags.StringVar(&s.config, "config", "/etc/aziot/config.toml", "config.toml, or this service's settings that 'iotedge config apply' writes (/etc/aziot/tpmd/config.toml): its [tpm] table sets tcti and auth_key_index; flags override it; ignored when absent")
	flags.StringVar(&s.user, "user", "", "when started as root: user to run as once the TPM is open and the socket exists (systemd's User= is the usual way)")
	flags.StringVar(&s.logLevel, "log-level", "info", "debug, info, warn or error")
	if err := flags.Parse(args); err != nil {
		return s, err
	}
	if flags.NArg() > 0 {
		return s, fmt.Errorf("unexpected arguments %q", flags.Args())
	}
	set := map[string]bool{}
	flags.Visit(func(f *flag.Flag) { set[f.Name] = true })
	c, err := readConfig(s.config)
	if err != nil {
		return s, err
	}
	if t := c.TPM; t.TCTI != nil && !set["tcti"] {
		s.tcti = *t.TCTI
	}
	if t := c.TPM; t.AuthKeyIndex != nil && !set["auth-key-index"] {
		s.authKeyIndex = uint32(*t.AuthKeyIndex)
	}
	// A device not provisioned yet (no source, or "none") may still have
	// its TPM read, to enroll it.
	if p := c.Provisioning; p.Source != "" && p.Source != "none" && !(p.Source == "dps" && p.Attestation.Method == "tpm") && !set["tcti"] {
		s.unused = fmt.Sprintf("%s provisions the device with source %q and attestation method %q, not with DPS and the TPM", s.config, p.Source, p.Attestation.Method)
	}
	return s, tpm.CheckAuthKeyIndex(s.authKeyIndex)
}

// fileConfig is what aziot-tpmd reads of config.toml: the [tpm] table, and
// whether provisioning uses the TPM at all; the rest is the edge daemon's
// business.
type fileConfig struct {
	Provisioning struct {
		Source      string `toml:"source"`
		Attestation struct {
			Method string `toml:"method"`
		} `toml:"attestation"`
	} `toml:"provisioning"`
	TPM tpmTable `toml:"tpm"`
}

// tpmTable is the [tpm] table of config.toml.
type tpmTable struct {
	TCTI         *string   `toml:"tcti"`
	AuthKeyIndex *keyIndex `toml:"auth_key_index"`
}

// keyIndex takes auth_key_index as an integer (0x100) or, as Azure's
// documentation writes it, a string ("0x00_01_00").
type keyIndex uint32

func (k *keyIndex) UnmarshalText(b []byte) error {
	n, err := strconv.ParseUint(string(b), 0, 32)
	if err != nil {
		return fmt.Errorf("auth_key_index %q is not a number", b)
	}
	*k = keyIndex(n)
	return nil
}

// readConfig reads path, empty when path is absent.
func readConfig(path string) (fileConfig, error) {
	var c fileConfig
	b, err := os.ReadFile(path)
	switch {
	case path == "" || errors.Is(err, fs.ErrNotExist):
		return c, nil
	case errors.Is(err, fs.ErrPermission):
		return c, fmt.Errorf("config %s: permission denied: pass --config /etc/aziot/tpmd/config.toml, which 'iotedge config apply' writes for this service "+
			"(config.toml may hold the device's keys, which this service's user is not to read), or --tcti and --auth-key-index with --config ''", path)
	case err != nil:
		return c, fmt.Errorf("config: %w", err)
	}
	if err := toml.Unmarshal(b, &c); err != nil {
		if de, ok := errors.AsType[*toml.DecodeError](err); ok {
			row, col := de.Position()
			return c, fmt.Errorf("config %s:%d:%d: %w", path, row, col, err)
		}
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	s, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(s.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})))
	if s.unused != "" { // a clean exit: systemd does not restart it
		slog.Info("aziot-tpmd has nothing to serve: " + s.unused)
		return nil
	}

	dev, err := tpm.Open(s.tcti)
	if err != nil {
		return err
	}
	defer dev.Close()
	// Fail now rather than at the first request when the TPM does not
	// answer; this also provisions the EK and SRK as the seed script does.
	ek, err := dev.EndorsementKey()
	if err != nil {
		return err
	}
	l, err := tpmservice.Listen(s.socket, s.group)
	if err != nil {
		return err
	}
	if s.user != "" {
		if err := dropPrivileges(s.user); err != nil {
			l.Close()
			return err
		}
	}
	slog.Info("aziot-tpmd serving", "socket", s.socket, "tcti", s.tcti,
		"identityHandle", fmt.Sprintf("0x%08x", tpm.IdentityHandle(s.authKeyIndex)),
		"registrationId", attest.RegistrationID(ek), "uid", os.Getuid())
	srv := tpmservice.NewServer(dev, s.authKeyIndex)
	srv.Signers = principalUIDs(s.principals)
	err = tpmservice.ServeListener(ctx, l, srv)
	slog.Info("aziot-tpmd stopped")
	return err
}

// principalUIDs are the uids of root, of the service's own user (who may
// open the TPM anyway) and of the users names lists; one that does not
// exist is left out, with a warning.
func principalUIDs(names string) []uint32 {
	uids := []uint32{0, uint32(os.Getuid())}
	for _, name := range strings.Split(names, ",") {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		u, err := user.Lookup(name)
		if err != nil {
			slog.Warn("a principal is not a user here: it may not use the identity key", "user", name, "error", err)
			continue
		}
		if uid, err := strconv.ParseUint(u.Uid, 10, 32); err == nil {
			uids = append(uids, uint32(uid))
		}
	}
	return uids
}
