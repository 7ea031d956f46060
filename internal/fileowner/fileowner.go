// Package fileowner describes who may use a file, for error messages that
// tell an administrator what to change.
package fileowner

import (
	"fmt"
	"io/fs"
	"os/user"
	"strconv"
	"syscall"
)

// Describe is fi's permission bits, owner and group, as "-rw-r----- root:iotedge".
func Describe(fi fs.FileInfo) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fi.Mode().Perm().String()
	}
	owner, group := strconv.Itoa(int(st.Uid)), strconv.Itoa(int(st.Gid))
	if u, err := user.LookupId(owner); err == nil {
		owner = u.Username
	}
	if g, err := user.LookupGroupId(group); err == nil {
		group = g.Name
	}
	return fmt.Sprintf("%s %s:%s", fi.Mode().Perm(), owner, group)
}
