# One command runs Hatchery, one runs the tests. See README.md.

GO          ?= go
BIN         := $(CURDIR)/bin
STATICCHECK := $(BIN)/staticcheck
HOSTNAME    ?= $(shell hostname)

.PHONY: run build test test-deps lint bench

# Run the provisioning service and hub on port 443 (the Azure SDKs expect it).
run:
	$(GO) run ./cmd/hatchery serve --hostname $(HOSTNAME)

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# Install what the tests use, lint, then run every test: unit, swtpm and
# tpm2-tools, and the official Azure Node SDKs against a live server.
test: test-deps lint
	$(GO) test -count=1 -timeout 20m ./...

test-deps:
	./scripts/install-test-deps.sh

lint: $(STATICCHECK)
	$(GO) vet ./...
	$(STATICCHECK) ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt would change:"; gofmt -l $$(git ls-files '*.go'); exit 1; }

$(STATICCHECK):
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./internal/...

# The Debian packages: dist/hatchery_*.deb (the server as a systemd service,
# and the CLI) and dist/hatchery-iotedge_*.deb (the device runtime: binaries,
# systemd units, udev rule, config template, users and groups).
# VERSION=... overrides the version; see packaging/README.md.
.PHONY: deb
deb:
	VERSION='$(VERSION)' GO='$(GO)' ./scripts/build-deb.sh dist
