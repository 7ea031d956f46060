package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/hatchery/hatchery/internal/attest"
	"github.com/hatchery/hatchery/internal/tpm"
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
			if env := os.Getenv("TPM2TOOLS_TCTI"); env != "" && !cmd.Flags().Changed("tcti") {
				tcti = env
			}
			return provisionInfo(cmd.OutOrStdout(), tcti, output, legacy)
		},
	}
	info.Flags().StringVar(&tcti, "tcti", "device", `TPM to use, as a tpm2-tss TCTI string: "device", "device:/dev/tpm0", "swtpm:host=H,port=P" or "mssim:host=H,port=P"; when not given, $TPM2TOOLS_TCTI if set`)
	info.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	info.Flags().BoolVar(&legacy, "legacy-registration-id", false, "print the base32 registration ID of the C and Node.js SDKs instead of the hex one")
	cmd.AddCommand(info)
	return cmd
}

// provisionInfo prints what an operator needs to enroll the device; the
// text layout is the seed script's (shared/seeds/tpm-provision-info.sh).
func provisionInfo(w io.Writer, tcti, output string, legacy bool) error {
	if output != "text" && output != "json" {
		return fmt.Errorf("--output %q: want text or json", output)
	}
	dev, err := tpm.Open(tcti)
	if err != nil {
		return err
	}
	defer dev.Close()
	ek, err := dev.EndorsementKey()
	if err != nil {
		return err
	}
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
	_, err = fmt.Fprintf(w, "Gathering the registration information...\n\nRegistration Id:\n%s\n\nEndorsement Key:\n%s\n", id, key)
	return err
}
