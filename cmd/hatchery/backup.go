package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

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
move DIR into place).

With PostgreSQL (--database), back up the database with pg_dump; backup then
copies the tls/ directory alone.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, _ := cmd.Flags().GetString("data-dir")
			if to == "" {
				return errors.New("--to is required: a directory that does not exist yet")
			}
			if _, err := os.Stat(to); err == nil {
				return fmt.Errorf("%s exists: back up into a new directory", to)
			}
			raw, err := os.ReadFile(filepath.Join(dir, endpointFile))
			if err != nil {
				return fmt.Errorf("no Hatchery installation in %s (%v)", dir, err)
			}
			var ep endpoint
			if err := json.Unmarshal(raw, &ep); err != nil {
				return fmt.Errorf("%s is corrupt: %v", filepath.Join(dir, endpointFile), err)
			}
			if err := os.MkdirAll(filepath.Join(to, "tls"), 0o700); err != nil {
				return err
			}
			src, dst := pki.FilesIn(dir), pki.FilesIn(to)
			for _, f := range [][2]string{{src.CACert, dst.CACert}, {src.CAKey, dst.CAKey}, {src.ServerCert, dst.ServerCert}, {src.ServerKey, dst.ServerKey}} {
				if err := copyFile(f[0], f[1]); err != nil && !errors.Is(err, os.ErrNotExist) { // none with --tls-cert
					return err
				}
			}
			if ep.ExternalDatabase || database(cmd) != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "copied the TLS material into %s; the state is in PostgreSQL: back it up with pg_dump\n", to)
				return nil
			}
			db, err := store.OpenSQLite(filepath.Join(dir, store.DefaultSQLiteFile))
			if err != nil {
				return err
			}
			defer db.Close()
			if err := db.BackupTo(cmd.Context(), filepath.Join(to, store.DefaultSQLiteFile)); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "backed up %s into %s: restore by serving with --data-dir %s\n", dir, to, to)
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the new directory to write the backup into")
	return cmd
}

// copyFile copies a file with its mode (the keys' 0600).
func copyFile(from, to string) error {
	fi, err := os.Stat(from)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, data, fi.Mode().Perm())
}
