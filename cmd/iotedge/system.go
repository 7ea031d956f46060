package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/edge/mgmt"
	"github.com/hatchery/hatchery/internal/tpmservice"
)

func withTimeout(cmd *cobra.Command) (context.Context, context.CancelFunc) {
	return context.WithTimeout(cmd.Context(), 15*time.Second)
}

func newSystemCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "system", Short: "Manage the runtime's services"}
	status := &cobra.Command{Use: "status", Short: "Show the state of the runtime's services", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := withTimeout(cmd)
			defer cancel()
			return systemStatus(ctx, cmd.OutOrStdout())
		}}
	var tail string
	var follow bool
	logs := &cobra.Command{Use: "logs", Short: "Show the runtime's logs", Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if underSystemd() {
				jargs := []string{"--no-pager", "-n", tail}
				for _, s := range services {
					jargs = append(jargs, "-u", s)
				}
				if follow {
					jargs = append(jargs, "-f")
				}
				j := exec.Command("journalctl", append(jargs, args...)...)
				j.Stdout, j.Stderr = os.Stdout, os.Stderr
				return j.Run()
			}
			client, err := mgmtClient()
			if err != nil {
				return err
			}
			body, err := client.Logs(cmd.Context(), tail, follow)
			if err != nil {
				return err
			}
			defer body.Close()
			_, err = io.Copy(cmd.OutOrStdout(), body)
			return err
		}}
	logs.Flags().StringVar(&tail, "tail", "200", "number of lines")
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new lines")
	restart := &cobra.Command{Use: "restart", Short: "Restart the runtime", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if underSystemd() {
				return systemctl(append([]string{"restart"}, services...)...)
			}
			return call(cmd, func(ctx context.Context, c *mgmt.Client) error { return c.Reload(ctx) })
		}}
	stop := &cobra.Command{Use: "stop", Short: "Stop the runtime", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if underSystemd() {
				return systemctl(append([]string{"stop"}, services...)...)
			}
			return call(cmd, func(ctx context.Context, c *mgmt.Client) error { return c.Stop(ctx) })
		}}
	reprovision := &cobra.Command{Use: "reprovision", Short: "Provision the device again through DPS", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := call(cmd, func(ctx context.Context, c *mgmt.Client) error { return c.Reprovision(ctx) }); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "Provisioning the device again: `iotedge system status` shows the outcome.")
			return nil
		}}
	level := &cobra.Command{Use: "set-log-level LEVEL", Short: "Set the runtime's log level (trace, debug, info, warn, error)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd, func(ctx context.Context, c *mgmt.Client) error { return c.SetLogLevel(ctx, args[0]) })
		}}
	cmd.AddCommand(status, logs, restart, stop, reprovision, level)
	return cmd
}

// call runs one management request.
func call(cmd *cobra.Command, f func(context.Context, *mgmt.Client) error) error {
	client, err := mgmtClient()
	if err != nil {
		return err
	}
	ctx, cancel := withTimeout(cmd)
	defer cancel()
	return f(ctx, client)
}

// systemStatus prints the services' states, as Azure's `iotedge system
// status` does, and what the daemon knows of the device.
func systemStatus(ctx context.Context, w io.Writer) error {
	client, err := mgmtClient()
	if err != nil {
		return err
	}
	st, stErr := client.Status(ctx)
	// Known only once the device is provisioned: before that, the TPM
	// service may be what it waits for.
	tpmUnused := stErr == nil && st.Provisioning.Method != "" && st.Provisioning.Method != "tpm"
	tw := tabwriter.NewWriter(w, 0, 4, 4, ' ', 0)
	fmt.Fprintln(w, "System services:")
	for _, svc := range services {
		state := "Down"
		switch {
		case underSystemd():
			out, _ := exec.Command("systemctl", "is-active", svc).Output()
			state = map[string]string{"active": "Running", "activating": "Starting", "inactive": "Stopped", "failed": "Failed"}[strings.TrimSpace(string(out))]
			if svc == "aziot-tpmd" && state == "Stopped" && tpmUnused {
				state = "Not used" // it exits when the device provisions without the TPM
			}
		case svc == "iotedged" && stErr == nil:
			state = "Running"
		case svc == "aziot-tpmd":
			// Asked itself: the daemon's view is only as fresh as its last
			// use of the TPM.
			switch _, err := tpmservice.Dial(tpmSocket()).EndorsementKey(); {
			case err == nil:
				state = "Running"
			case tpmUnused:
				state = "Not used"
			case errors.Is(err, fs.ErrPermission):
				state = "Unknown (this user may not ask it: run with sudo)"
			case !errors.Is(err, tpmservice.ErrNotRunning):
				state = "Failed: " + err.Error()
			}
		}
		fmt.Fprintf(tw, "    %s\t%s\n", svc, state)
	}
	_ = tw.Flush()
	fmt.Fprintln(w)
	if stErr != nil {
		fmt.Fprintln(w, stErr)
		return nil
	}
	fmt.Fprintf(w, "Runtime:      %s (since %s)\n", st.State, st.Since.Local().Format(time.DateTime))
	if st.ConfigError != "" {
		fmt.Fprintf(w, "Config error: %s\n", st.ConfigError)
	}
	p := st.Provisioning
	switch {
	case p.DeviceID != "":
		from := ""
		if p.FromBackup {
			from = " (from the identity backup)"
		}
		fmt.Fprintf(w, "Device:       %s on hub %s, provisioned by %s/%s%s\n", p.DeviceID, p.HubHostName, p.Source, p.Method, from)
	case p.Error != "":
		fmt.Fprintf(w, "Provisioning: failed: %s\n", p.Error)
	}
	if p.Error != "" && p.DeviceID != "" {
		fmt.Fprintf(w, "Provisioning: %s\n", p.Error)
	}
	fmt.Fprintf(w, "Hub:          %s\n", connText(st.Hub, "connected"))
	fmt.Fprintf(w, "Engine:       %s\n", connText(st.Engine, "reachable"))
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Use 'iotedge system logs' to check for non-fatal errors.")
	fmt.Fprintln(w, "Use 'iotedge check' to diagnose connectivity and configuration issues.")
	return nil
}

func connText(c mgmt.Connection, ok string) string {
	switch {
	case c.OK:
		return ok
	case c.Error != "":
		return c.Error
	}
	return "unknown"
}

func newListCmd() *cobra.Command {
	return &cobra.Command{Use: "list", Short: "List the modules", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var ms []mgmt.Module
			if err := call(cmd, func(ctx context.Context, c *mgmt.Client) (err error) { ms, err = c.Modules(ctx); return }); err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 4, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATUS\tDESCRIPTION\tCONFIG")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.Name, m.Status, m.Description, m.Config)
			}
			return tw.Flush()
		}}
}

func newLogsCmd() *cobra.Command {
	var tail, since, until string
	var follow bool
	c := &cobra.Command{Use: "logs MODULE", Short: "Show a module's logs", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := mgmtClient()
			if err != nil {
				return err
			}
			body, err := client.ModuleLogs(cmd.Context(), args[0], tail, since, until, follow)
			if err != nil {
				return err
			}
			defer body.Close()
			_, err = io.Copy(cmd.OutOrStdout(), body)
			return err
		}}
	c.Flags().StringVar(&tail, "tail", "all", "number of lines from the end")
	c.Flags().StringVar(&since, "since", "", "only lines since a time (RFC 3339, Unix) or a duration back from now (90 minutes, 1 day, 6h)")
	c.Flags().StringVar(&until, "until", "", "only lines until a time (RFC 3339, Unix) or a duration back from now (90 minutes, 1 day, 6h)")
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new lines")
	return c
}

func newRestartCmd() *cobra.Command {
	return &cobra.Command{Use: "restart MODULE", Short: "Restart a module", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd, func(ctx context.Context, c *mgmt.Client) error { return c.Restart(ctx, args[0]) })
		}}
}

// Version is set at build time (-ldflags "-X main.Version=...").
var Version = "1.5.0-hatchery"

func newVersionCmd() *cobra.Command {
	return &cobra.Command{Use: "version", Short: "Show the runtime's version", Args: cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) { fmt.Fprintf(cmd.OutOrStdout(), "iotedge %s\n", Version) }}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
