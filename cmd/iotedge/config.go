package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/atomicfile"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/starthint"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

func newConfigCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Manage the runtime's configuration (/etc/aziot/config.toml)"}
	cmd.AddCommand(newConfigApplyCmd(), newConfigImportCmd(), newConfigMPCmd())
	return cmd
}

// printWarnings shows what the parser noticed, and errors with their lines.
func printWarnings(ws []config.Warning) {
	for _, w := range ws {
		fmt.Fprintln(os.Stderr, "warning:", w.String())
	}
}

func newConfigApplyCmd() *cobra.Command {
	var file string
	var noRestart bool
	c := &cobra.Command{
		Use:   "apply",
		Short: "Check the configuration and (re)start the runtime with it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("this command must run as root: sudo iotedge config apply")
			}
			target := configPath()
			if file == "" {
				file = target
			}
			cfg, ws, err := config.Load(file)
			printWarnings(ws)
			if err != nil {
				return err
			}
			if err := checkDaemonAccess(cfg); err != nil {
				return err
			}
			for _, w := range exposedKeys(cfg) {
				fmt.Fprintln(os.Stderr, "warning:", w)
			}
			data, err := os.ReadFile(file)
			if err != nil {
				return err
			}
			if err := installConfig(target, data, cfg, user.Lookup); err != nil {
				return err
			}
			if noRestart {
				return nil
			}
			if underSystemd() {
				fmt.Println("Restarting the IoT Edge services...")
				if err := systemctl(append([]string{"enable"}, services...)...); err != nil {
					return err
				}
				if err := systemctl(append([]string{"restart"}, services...)...); err != nil {
					return err
				}
			} else {
				// Without systemd nothing starts aziot-tpmd, which is to
				// start before iotedged: said first, also when iotedged
				// is not running either.
				if p := cfg.Provisioning; p.Source == config.SourceDPS && p.Attestation.Method == "tpm" {
					if _, err := tpmservice.Dial(tpmSocket()).EndorsementKey(); errors.Is(err, tpmservice.ErrNotRunning) {
						fmt.Fprintf(os.Stderr, "warning: the device provisions with its TPM, and aziot-tpmd is not running: %s; the runtime retries until it answers\n",
							starthint.Service("aziot-tpmd", "aziot-tpmd"))
					}
				}
				client, err := mgmtClient()
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
				defer cancel()
				if err := client.Reload(ctx); err != nil {
					return fmt.Errorf("the configuration is valid but the daemon did not take it: %w", err)
				}
			}
			fmt.Println("Done. Check the runtime with `iotedge system status`.")
			return nil
		},
	}
	c.Flags().StringVarP(&file, "config-file", "c", "", "the configuration to apply (default /etc/aziot/config.toml)")
	c.Flags().BoolVar(&noRestart, "no-restart", false, "install the configuration for the services without (re)starting them")
	return c
}

// realPath is the file a symlink at path names (path when it names none):
// a file written by rename replaces the link's target, not the link, which
// would leave the key readable where the link pointed.
func realPath(path string) string {
	if p, err := filepath.EvalSymlinks(path); err == nil {
		return p
	}
	return path
}

// writeNew writes a generated config.toml, refusing to overwrite.
func writeNew(path string, cfg *config.Config, force bool) error {
	if _, err := os.Stat(path); err == nil && !force {
		return fmt.Errorf("%s exists: pass --force to overwrite it", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	// It may hold keys: 0600 even over an existing file of another mode.
	if err := atomicfile.Write(realPath(path), cfg.Used().TOML(), 0o600); err != nil {
		return err
	}
	apply := "sudo iotedge config apply"
	if path != configPath() {
		apply += " -c " + path
	}
	fmt.Printf("Wrote %s. Apply it with `%s`.\n", path, apply)
	if cfg.TrustBundleCert == "" {
		fmt.Printf("It trusts the system's CA certificates only: for a hub whose certificate another CA issued (Hatchery's local CA),\n"+
			"add trust_bundle_cert = \"file:///path/to/ca.pem\" at the top of %s first.\n", path)
	}
	return nil
}

func newConfigImportCmd() *cobra.Command {
	var in, out string
	var force bool
	c := &cobra.Command{
		Use:   "import",
		Short: "Convert an IoT Edge 1.1 config.yaml into config.toml",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			data, err := os.ReadFile(in)
			if err != nil {
				return err
			}
			cfg, ws, err := config.ParseLegacyYAML(in, data)
			printWarnings(ws)
			if err != nil {
				return err
			}
			return writeNew(out, cfg, force)
		},
	}
	c.Flags().StringVarP(&in, "config-file", "c", config.LegacyPath, "the 1.1 configuration to import")
	// -i, this CLI's shorthand before it took Azure's -c.
	c.Flags().StringVarP(&in, "in-config-file", "i", config.LegacyPath, "the 1.1 configuration to import")
	_ = c.Flags().MarkHidden("in-config-file")
	c.Flags().StringVarP(&out, "out-config-file", "o", configPath(), "where to write config.toml")
	c.Flags().BoolVarP(&force, "force", "f", false, "overwrite an existing config.toml")
	return c
}

func newConfigMPCmd() *cobra.Command {
	var cs, out string
	var force bool
	c := &cobra.Command{
		Use:   "mp",
		Short: "Write a config.toml for manual provisioning with a device connection string",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.FromConnectionString(cs)
			if err != nil {
				return err
			}
			return writeNew(out, cfg, force)
		},
	}
	c.Flags().StringVarP(&cs, "connection-string", "c", "", "the device connection string")
	c.Flags().StringVarP(&out, "out-config-file", "o", configPath(), "where to write config.toml")
	c.Flags().BoolVarP(&force, "force", "f", false, "overwrite an existing config.toml")
	_ = c.MarkFlagRequired("connection-string")
	return c
}

// tpmdConfigPath is where aziot-tpmd's settings go: tpmd/config.toml
// beside config.toml, /etc/aziot/tpmd/config.toml as its unit reads it.
func tpmdConfigPath(configPath string) string {
	return filepath.Join(filepath.Dir(configPath), "tpmd", "config.toml")
}

// installConfig makes data the configuration at target, and gives each
// service what it reads of it. config.toml may hold the device's keys:
// only root and the user iotedged runs as (root where that user does not
// exist) may read it, never group iotedge, whose members (operators, and
// aziot-tpmd's user) use the CLI and the TPM's public keys. aziot-tpmd
// reads its settings, nothing secret, from a file of its own. Each file is
// replaced, not rewritten, so that no one reads the new contents through
// the old file, even one who opened it when it was readable to more.
func installConfig(target string, data []byte, cfg *config.Config, lookup func(string) (*user.User, error)) error {
	uid := 0
	if u, err := lookup(serviceUser); err == nil {
		if uid, err = strconv.Atoi(u.Uid); err != nil {
			return fmt.Errorf("user %s: uid %q", serviceUser, u.Uid)
		}
	}
	if err := atomicfile.WriteOwned(realPath(target), data, 0o600, uid, 0); err != nil {
		return fmt.Errorf("installing %s: %w", target, err)
	}
	tpmd := tpmdConfigPath(target)
	if err := os.MkdirAll(filepath.Dir(tpmd), 0o755); err != nil {
		return err
	}
	// 0755 whatever root's umask: aziot-tpmd's user goes through it.
	if err := os.Chmod(filepath.Dir(tpmd), 0o755); err != nil {
		return err
	}
	if err := atomicfile.Write(tpmd, cfg.TPMDConfig(target), 0o644); err != nil {
		return fmt.Errorf("writing aziot-tpmd's settings: %w", err)
	}
	return nil
}
