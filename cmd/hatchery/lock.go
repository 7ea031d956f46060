package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// lockFile keeps a second `hatchery serve` off what one uses already — a
// data directory, a SQLite database elsewhere — by an exclusive lock on
// path, which ends with the process: two servers would each write
// endpoint.json, and cut off and record disconnected the other's devices.
func lockFile(path, what string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("locking the %s: %w", what, err)
	}
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	// A command asking whether a server holds it (lockHeld) holds it for
	// an instant: that is no server.
	for end := time.Now().Add(200 * time.Millisecond); errors.Is(err, syscall.EWOULDBLOCK) && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	}
	if err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			pid, _ := os.ReadFile(path)
			return nil, fmt.Errorf("another hatchery serve (pid %s) uses the %s: stop it, or give this one its own",
				strings.TrimSpace(string(pid)), what)
		}
		return nil, fmt.Errorf("locking the %s: %w", what, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}

// serveLock is the data directory's lock file, held by its server.
const serveLock = "serve.lock"

// lockHeld says whether a process holds path's lock, and its pid.
func lockHeld(path string) (pid string, held bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		return strings.TrimSpace(string(b)), errors.Is(err, syscall.EWOULDBLOCK)
	}
	return "", false
}
