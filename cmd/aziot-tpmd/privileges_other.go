//go:build !unix

package main

import "errors"

func dropPrivileges(string) error { return errors.New("--user is supported on Unix only") }
