package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/pki"
	"github.com/hatchery/hatchery/internal/store"
)

func backupCmd() *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "backup --to DIR",
		Short: "Copy the database and the TLS material into a new data directory, while the server runs",
		Long: `Backup writes a consistent copy of the SQLite database (taken while the server
runs) and the tls/ directory, whose CA key devices' trust depends on, into DIR,
a new directory. To restore, stop the server and serve with --data-dir DIR (or
move DIR into place); for the package's service, backup prints the commands.

With PostgreSQL (--database), back up the database with pg_dump; backup then
copies the tls/ directory alone.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, _ := cmd.Flags().GetString("data-dir")
			if to == "" {
				return errors.New("--to is required: a directory that does not exist yet")
			}
			// A server on PostgreSQL needs --database: opening the data
			// directory's SQLite file instead would back up an empty one.
			_, st, err := openSite(cmd)
			if err != nil {
				return err
			}
			defer st.Close()
			// A directory of its own, made here (not one someone else put
			// there first): it holds the CA key and every device's keys.
			if err := os.MkdirAll(filepath.Dir(filepath.Clean(to)), 0o755); err != nil {
				return err
			}
			if err := os.Mkdir(to, 0o700); err != nil {
				if errors.Is(err, os.ErrExist) {
					return fmt.Errorf("%s exists: back up into a new directory", to)
				}
				return err
			}
			msg, err := backup(cmd.Context(), dir, to, st)
			if err != nil {
				// Half a backup must not pass for one: served, it would
				// come up as a new installation.
				_ = os.RemoveAll(to)
				return fmt.Errorf("backing up into %s: %w (nothing was kept there)", to, err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), msg)
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the new directory to write the backup into")
	return cmd
}

// backup copies dir's TLS material and st (if SQLite) into the new
// directory to, and says what it did.
func backup(ctx context.Context, dir, to string, st store.Store) (string, error) {
	if err := os.Mkdir(filepath.Join(to, "tls"), 0o700); err != nil {
		return "", err
	}
	src, dst := pki.FilesIn(dir), pki.FilesIn(to)
	copied := 0
	for _, f := range []struct {
		from, to string
		mode     os.FileMode
	}{{src.CACert, dst.CACert, 0o644}, {src.CAKey, dst.CAKey, 0o600}, {src.ServerCert, dst.ServerCert, 0o644}, {src.ServerKey, dst.ServerKey, 0o600}} {
		switch err := copyFile(f.from, f.to, f.mode); {
		case err == nil:
			copied++
		case !errors.Is(err, os.ErrNotExist):
			return "", err
		}
	}
	note := ""
	if copied == 0 {
		note = "; there is no local CA (the server uses --tls-cert): serve the backup with the same --tls-cert, --tls-key and --tls-ca"
	}
	lite, ok := st.(*store.SQLite)
	if !ok {
		return fmt.Sprintf("copied the TLS material into %s; the state is in PostgreSQL: back it up with pg_dump%s", to, note), nil
	}
	if err := lite.BackupTo(ctx, filepath.Join(to, store.DefaultSQLiteFile)); err != nil {
		return "", fmt.Errorf("writing the database copy: %w", err)
	}
	return fmt.Sprintf("backed up %s into %s: %s%s", dir, to, restoreHint(dir, to), note), nil
}

// restoreHint says how to restore the backup in to of dir: the package's
// service serves one data directory, as its user.
func restoreHint(dir, to string) string {
	if !isPackagedDataDir(dir) {
		return "restore by serving with --data-dir " + to
	}
	return fmt.Sprintf("restore with `systemctl stop hatchery && mv %[1]s %[1]s.before-restore-$(date +%%s) && cp -a %[2]s %[1]s && chown -R hatchery:hatchery %[1]s && systemctl start hatchery`",
		packagedDataDir, shellQuote(to))
}

// shellQuote is s as one word of a POSIX shell command.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-+:=@%,", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// copyFile copies a file into a new one of mode.
func copyFile(from, to string, mode os.FileMode) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
