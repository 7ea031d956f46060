package main

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/hatchery/hatchery/internal/edge/config"
	"github.com/hatchery/hatchery/internal/fileowner"
)

// serviceUser is the account iotedged runs as.
const serviceUser = "iotedge"

// daemonFiles are the local files a configuration names that iotedged
// reads, by the setting that names them.
func daemonFiles(c *config.Config) map[string]string {
	p := c.Provisioning
	refs := map[string]string{
		"trust_bundle_cert":                            c.TrustBundleCert,
		"provisioning.payload.uri":                     p.Payload.URI,
		"provisioning.attestation.symmetric_key.uri":   p.Attestation.SymmetricKey.URI,
		"provisioning.attestation.identity_cert":       p.Attestation.IdentityCert,
		"provisioning.attestation.identity_pk":         p.Attestation.IdentityPK,
		"provisioning.authentication.device_id_pk.uri": p.Authentication.DeviceIDPK.URI,
		"provisioning.authentication.identity_cert":    p.Authentication.IdentityCert,
		"provisioning.authentication.identity_pk":      p.Authentication.IdentityPK,
	}
	files := map[string]string{}
	for setting, ref := range refs {
		if ref != "" {
			files[setting] = config.FilePath(ref)
		}
	}
	return files
}

// keySettings name the files that hold the device's keys: only user
// iotedge may read them, not group iotedge, whose members are operators.
var keySettings = map[string]bool{
	"provisioning.attestation.symmetric_key.uri":   true,
	"provisioning.attestation.identity_pk":         true,
	"provisioning.authentication.device_id_pk.uri": true,
	"provisioning.authentication.identity_pk":      true,
}

// checkDaemonAccess tells, before the daemon fails on it at start, which
// of the files it reads the service user cannot; nil on a machine without
// that user, where root runs everything.
func checkDaemonAccess(c *config.Config) error {
	u, err := user.Lookup(serviceUser)
	if err != nil {
		return nil
	}
	uid, _ := strconv.Atoi(u.Uid)
	var gids []int
	if ids, err := u.GroupIds(); err == nil {
		for _, g := range ids {
			n, _ := strconv.Atoi(g)
			gids = append(gids, n)
		}
	}
	files := daemonFiles(c)
	var problems []string
	for _, setting := range slices.Sorted(maps.Keys(files)) {
		if err := readableBy(files[setting], uid, gids, keySettings[setting]); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", setting, err))
		}
	}
	if len(problems) > 0 {
		return errors.New("user " + serviceUser + ", which runs iotedged, cannot read what the configuration names:\n  " + strings.Join(problems, "\n  "))
	}
	return nil
}

// exposedKeys warns of each key file the configuration names that others
// than its owner may read (group root aside): all who can read a key can
// connect as the device.
func exposedKeys(c *config.Config) []string {
	files := daemonFiles(c)
	var warnings []string
	for _, setting := range slices.Sorted(maps.Keys(files)) {
		path := files[setting]
		fi, err := os.Stat(path)
		if !keySettings[setting] || err != nil {
			continue
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if mode := fi.Mode().Perm(); mode&0o004 != 0 || mode&0o040 != 0 && ok && st.Gid != 0 {
			warnings = append(warnings, fmt.Sprintf("%s: %s is %s: others than user %s can read the device's key: 'sudo chown %s %s && sudo chmod 0600 %s'",
				setting, path, fileowner.Describe(fi), serviceUser, serviceUser, path, path))
		}
	}
	return warnings
}

// readableBy says why the user uid, in groups gids, cannot read path (nor
// reach it through its directories); nil if it can. A key is to be given
// to the user, anything else may go to its group.
func readableBy(path string, uid int, gids []int, key bool) error {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s does not exist", path)
	}
	if err != nil {
		return err
	}
	switch {
	case permits(fi, uid, gids, 4):
	case key:
		return fmt.Errorf("%s is %s: it holds a key, so give it to the user alone with 'sudo chown %s %s && sudo chmod 0600 %s'",
			path, fileowner.Describe(fi), serviceUser, path, path)
	default:
		return fmt.Errorf("%s is %s: give it to the group with 'sudo chgrp %s %s && sudo chmod g+r %s'",
			path, fileowner.Describe(fi), serviceUser, path, path)
	}
	for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
		if di, err := os.Stat(dir); err == nil && !permits(di, uid, gids, 1) {
			return fmt.Errorf("%s is in %s, which is %s: let the group through with 'sudo chgrp %s %s && sudo chmod g+x %s'",
				path, dir, fileowner.Describe(di), serviceUser, dir, dir)
		}
		if dir == "/" {
			return nil
		}
	}
}

// permits applies the owner, group or other bits of fi's mode, whichever
// class uid falls in, to want (4 read, 1 search).
func permits(fi fs.FileInfo, uid int, gids []int, want fs.FileMode) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true
	}
	mode := fi.Mode().Perm()
	switch {
	case int(st.Uid) == uid:
		return mode&(want<<6) != 0
	case slices.Contains(gids, int(st.Gid)):
		return mode&(want<<3) != 0
	}
	return mode&want != 0
}
