package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/tpm"
	"github.com/hatchery/hatchery/internal/tpmservice"
	"github.com/pelletier/go-toml/v2"
	"github.com/spf13/cobra"
)

func newTPMCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "tpm", Short: "Work with this device's TPM"}
	var tcti, output string
	var legacy bool
	info := &cobra.Command{
		Use:   "provision-info",
		Short: "Print the registration ID and endorsement key to enroll this device",
		Long: "Print the registration ID and endorsement key to enroll this device in the provisioning service,\n" +
			"creating the endorsement and storage root keys first when the TPM has none.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("--output %q: want text or json", output)
			}
			ek, err := endorsementKey(tcti, cmd.Flags().Changed("tcti"), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return provisionInfo(cmd.OutOrStdout(), ek, output, legacy)
		},
	}
	info.Flags().StringVar(&tcti, "tcti", "device", `TPM to use, as a tpm2-tss TCTI string: "device", "device:/dev/tpm0", "swtpm:host=H,port=P" or "mssim:host=H,port=P"; `+
		`when not given, $TPM2TOOLS_TCTI, else the runtime's TPM through aziot-tpmd if it runs, else config.toml's [tpm] tcti`)
	info.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	info.Flags().BoolVar(&legacy, "legacy-registration-id", false, "print the base32 registration ID of the C and Node.js SDKs instead of the hex one")
	cmd.AddCommand(info)
	return cmd
}

// endorsementKey reads the EK from the TPM the user names, with --tcti
// (given) or $TPM2TOOLS_TCTI, or else from the TPM the runtime uses:
// through aziot-tpmd when it answers (it holds the TPM, and the CLI's user
// may not be allowed to), else as config.toml says, else tcti's default.
// A $TPM2TOOLS_TCTI of a kind this tool cannot open (tpm2-abrmd's
// "tabrmd") is passed over with a note to warn: such users reached their
// TPM through aziot-tpmd before the variable was read.
func endorsementKey(tcti string, given bool, warn io.Writer) ([]byte, error) {
	from := "--tcti"
	if env := os.Getenv("TPM2TOOLS_TCTI"); !given && env != "" {
		if kind, _, _ := strings.Cut(env, ":"); tpm.CheckTCTI(kind) != nil {
			fmt.Fprintf(warn, "$TPM2TOOLS_TCTI is %q, a TCTI this tool cannot open (it opens device, swtpm and mssim): reading the runtime's TPM instead "+
				"(name another with --tcti)\n", env)
		} else {
			tcti, given, from = env, true, "$TPM2TOOLS_TCTI"
		}
	}
	if !given {
		ek, err := tpmservice.Dial(tpmSocket()).EndorsementKey()
		var answer *tpmservice.Error
		if err == nil || errors.As(err, &answer) {
			return ek, err
		}
		from = ""
		if c := configTCTI(); c != "" {
			tcti, from = c, "config.toml's [tpm] tcti"
		}
	}
	ek, err := readEK(tcti)
	if err != nil && from != "" {
		return nil, fmt.Errorf("%s: %w", from, err)
	}
	return ek, err
}

func readEK(tcti string) ([]byte, error) {
	dev, err := tpm.Open(tcti)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	return dev.EndorsementKey()
}

// configTCTI is config.toml's [tpm] tcti or, for a user who may not read
// config.toml, aziot-tpmd's copy of it; "" when neither loads (the caller
// falls back to the default device).
func configTCTI() string {
	cfg, _, err := config.Load(configPath())
	if err == nil {
		return cfg.TPM.TCTI
	}
	if !errors.Is(err, fs.ErrPermission) {
		return ""
	}
	var tpmd struct {
		TPM struct {
			TCTI string `toml:"tcti"`
		} `toml:"tpm"`
	}
	if b, err := os.ReadFile(tpmdConfigPath(configPath())); err == nil && toml.Unmarshal(b, &tpmd) == nil {
		return tpmd.TPM.TCTI
	}
	return ""
}

// provisionInfo prints what an operator needs to enroll the device; the
// text layout is the seed script's (shared/seeds/tpm-provision-info.sh).
func provisionInfo(w io.Writer, ek []byte, output string, legacy bool) error {
	id := attest.RegistrationID(ek)
	if legacy {
		id = attest.LegacyRegistrationID(ek)
	}
	key := base64.StdEncoding.EncodeToString(ek)
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			RegistrationID string `json:"registrationId"`
			EndorsementKey string `json:"endorsementKey"`
		}{id, key})
	}
	_, err := fmt.Fprintf(w, "Gathering the registration information...\n\nRegistration Id:\n%s\n\nEndorsement Key:\n%s\n", id, key)
	return err
}
