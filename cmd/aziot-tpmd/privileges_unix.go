//go:build unix

package main

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// dropPrivileges makes the process run as name, with its groups. Go's
// syscall.Setuid and friends apply to every thread of the process.
func dropPrivileges(name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		return fmt.Errorf("--user: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if os.Geteuid() != 0 {
		if os.Geteuid() == uid {
			return nil
		}
		return fmt.Errorf("--user %s needs aziot-tpmd started as root (under systemd, set User=%s instead)", name, name)
	}
	var groups []int
	ids, err := u.GroupIds()
	if err != nil {
		return fmt.Errorf("--user %s: its groups: %w", name, err)
	}
	for _, id := range ids {
		if n, err := strconv.Atoi(id); err == nil {
			groups = append(groups, n)
		}
	}
	// Groups first: once the uid is not root, they cannot change.
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("--user %s: setgroups: %w", name, err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("--user %s: setgid: %w", name, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("--user %s: setuid: %w", name, err)
	}
	if os.Getuid() != uid || os.Geteuid() != uid || os.Getgid() != gid {
		return fmt.Errorf("--user %s: still uid %d gid %d after dropping privileges", name, os.Geteuid(), os.Getgid())
	}
	return nil
}
