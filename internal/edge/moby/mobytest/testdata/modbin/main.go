// Command modbin is the process of the test module images: it prints,
// writes a file, then runs until stopped, exits with a code or crashes, as
// its flags (or MODBIN_EXIT) say. It is built static, so an image of this
// one file runs.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	out := flag.String("print", "", "print this line on stdout")
	errOut := flag.String("stderr", "", "print this line on stderr")
	env := flag.String("env", "", "print these comma-separated variables as NAME=value")
	write := flag.String("write", "", "PATH=CONTENT: write CONTENT to PATH")
	exit := flag.Int("exit", -1, "exit with this code after -after (default: run until stopped; $MODBIN_EXIT)")
	crash := flag.Bool("crash", false, "panic after -after")
	after := flag.Duration("after", 0, "wait this long before exiting or crashing")
	flag.Parse()
	if v, err := strconv.Atoi(os.Getenv("MODBIN_EXIT")); err == nil && *exit < 0 {
		*exit = v
	}

	// As PID 1 the process gets no default signal handling: without this,
	// a stop would wait for the engine's kill.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	if *out != "" {
		fmt.Println(*out)
	}
	if *errOut != "" {
		fmt.Fprintln(os.Stderr, *errOut)
	}
	for _, name := range strings.Split(*env, ",") {
		if name != "" {
			fmt.Printf("%s=%s\n", name, os.Getenv(name))
		}
	}
	if path, content, ok := strings.Cut(*write, "="); ok {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
	}
	if *exit < 0 && !*crash {
		<-stop
		return
	}
	select {
	case <-time.After(*after):
	case <-stop:
		return
	}
	if *crash {
		panic("modbin: crashing as asked")
	}
	os.Exit(*exit)
}
