// Command iotedge is the IoT Edge device CLI: the verbs of Azure's
// `iotedge`, run on the device.
package main

import (
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:          "iotedge",
		Short:        "Manage the IoT Edge runtime on this device",
		SilenceUsage: true, // errors here are about the device, not the command line
	}
	root.AddCommand(newTPMCmd(), newConfigCmd(), newSystemCmd(), newListCmd(), newLogsCmd(), newRestartCmd(),
		newCheckCmd(), newSupportBundleCmd(), newVersionCmd())
	return root
}
