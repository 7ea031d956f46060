//go:build unix

package loadgen

import "syscall"

// RaiseFileLimit lifts the soft limit on open files to the hard limit and
// returns the limit now in force. (Go programs do this at start already;
// this makes the limit explicit and reports it.)
func RaiseFileLimit() (int, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, err
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			return 0, err
		}
	}
	return int(min(l.Cur, 1<<31-1)), nil
}
