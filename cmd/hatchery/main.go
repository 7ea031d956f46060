// Command hatchery runs the provisioning service and IoT hub (`serve`) and
// is the operator's CLI for them.
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/hatchery/hatchery/internal/azerr"
	"github.com/spf13/cobra"
)

// Version is set at build time (-ldflags "-X main.Version=..."), as the
// Debian package does.
var Version = "dev"

func main() {
	root := &cobra.Command{
		Use:           "hatchery",
		Version:       Version,
		Short:         "Provision IoT edge devices with TPM attestation, on your own infrastructure",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("data-dir", defaultDataDir(), "directory holding the database, TLS material and settings")
	root.PersistentFlags().StringP("output", "o", "table", "output format: table or json")
	// No default from HATCHERY_DATABASE here: help would print its password.
	root.PersistentFlags().String("database", "",
		"PostgreSQL URL postgres://user:pass@host/db shared by several replicas (default: $HATCHERY_DATABASE, else SQLite hatchery.db in --data-dir)")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		if o, _ := cmd.Flags().GetString("output"); o != "table" && o != "json" {
			return fmt.Errorf("--output %q: use table or json", o)
		}
		return nil
	}
	root.AddCommand(serveCmd(), infoCmd(), enrollmentCmd(), groupCmd(), registrationCmd(),
		deviceCmd(), twinCmd(), queryCmd(), methodCmd(), deploymentCmd(), edgeCmd(), eventsCmd(), c2dCmd(), certificateCmd(), hubCmd(), fleetCmd(), benchCmd(), backupCmd())
	refuseUnknownSubcommands(root)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		if e, ok := errors.AsType[*azerr.Error](err); ok && e.Name == "Unreachable" {
			dir, _ := root.PersistentFlags().GetString("data-dir")
			fmt.Fprintf(os.Stderr, "is the server running? (hatchery serve --data-dir %s, or the hatchery service)\n", dir)
		}
		os.Exit(1)
	}
}

// refuseUnknownSubcommands has every command group below cmd (enrollment,
// hub, ...) fail on a word that is none of its subcommands, as the root
// does, instead of printing its help and succeeding: a script's typo must
// not pass. The misspelt subcommand's own flags are no error of the group's.
func refuseUnknownSubcommands(cmd *cobra.Command) {
	for _, c := range cmd.Commands() {
		if c.HasSubCommands() && !c.Runnable() {
			c.FParseErrWhitelist.UnknownFlags = true
			c.SuggestionsMinimumDistance = 2
			c.RunE = func(c *cobra.Command, args []string) error {
				if len(args) == 0 {
					return c.Help()
				}
				hint := ""
				if s := c.SuggestionsFor(args[0]); len(s) > 0 {
					hint = fmt.Sprintf(" (did you mean %s?)", strings.Join(s, ", "))
				}
				return fmt.Errorf("unknown command %q for %q%s: `%s --help` lists its commands", args[0], c.CommandPath(), hint, c.CommandPath())
			}
		}
		refuseUnknownSubcommands(c)
	}
}

// packagedDataDir is where the Debian package's hatchery service keeps
// its state, as user hatchery.
const packagedDataDir = "/var/lib/hatchery"

// isPackagedDataDir reports whether dir is the package's service's, however
// it is spelled.
func isPackagedDataDir(dir string) bool { return filepath.Clean(dir) == packagedDataDir }

// defaultDataDir is $HATCHERY_DATA_DIR, else the user's own data directory
// when a server has served it, else the package's service's (`sudo
// hatchery enrollment list` on a machine that runs it) when it exists,
// else the user's own, to be created.
func defaultDataDir() string { return preferPackaged(userDataDir(), packagedDataDir) }

func preferPackaged(own, packaged string) string {
	if os.Getenv("HATCHERY_DATA_DIR") != "" {
		return own
	}
	if _, err := os.Stat(filepath.Join(own, endpointFile)); err != nil {
		if _, err := os.Stat(packaged); err == nil {
			return packaged
		}
	}
	return own
}

// userDataDir is serve's default data directory: the package's belongs to
// its service.
func userDataDir() string {
	if d := os.Getenv("HATCHERY_DATA_DIR"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return home + "/.local/share/hatchery"
	}
	return "hatchery-data"
}

// database is the --database flag, or HATCHERY_DATABASE.
func database(cmd *cobra.Command) string {
	if d, _ := cmd.Flags().GetString("database"); d != "" {
		return d
	}
	return os.Getenv("HATCHERY_DATABASE")
}

// packagedDefaults is the package's service's environment file.
const packagedDefaults = "/etc/default/hatchery"

// unescapeRe matches a backslash and the character it escapes.
var unescapeRe = regexp.MustCompile(`\\(.)`)

// envFileValue is key's value in a systemd environment file (KEY=VALUE
// lines, the value perhaps in quotes, with backslash escapes inside double
// ones; # starts a comment), "" if unset or unreadable.
func envFileValue(path, key string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	value := ""
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok || strings.TrimSpace(k) != key {
			continue
		}
		v = strings.TrimSpace(v)
		switch {
		case len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'':
			v = v[1 : len(v)-1]
		case len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"':
			// Inside double quotes a backslash escapes the next character.
			v = unescapeRe.ReplaceAllString(v[1:len(v)-1], "$1")
		}
		value = v // the last assignment wins, as in systemd
	}
	return value
}
