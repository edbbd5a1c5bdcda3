# Fleet Manager. `make run` builds and starts the embedded default (fm dev);
# `make test` runs every test; `make check` is what CI enforces.

GO          ?= go
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# fm version names the commit built and its date (none outside a git
# checkout).
COMMIT      := $(shell git rev-parse --verify -q HEAD 2>/dev/null)
COMMIT_DATE := $(shell git -c log.showSignature=false log -1 --format=%ct HEAD 2>/dev/null)
LDFLAGS     := -X main.version=$(VERSION) -X main.commit=$(COMMIT) -X main.commitDate=$(COMMIT_DATE)
STATICCHECK := $(shell $(GO) env GOPATH)/bin/staticcheck
STATICCHECK_VERSION := v0.8.2
NATS        := $(shell $(GO) env GOPATH)/bin/nats
NATSCLI_VERSION := v0.5.0
# e2e, the longest package, takes about 23 minutes under -race on 2 cores.
TEST_FLAGS  ?= -race -timeout 35m

.PHONY: build kits run test check lint fmt-check vet staticcheck tidy-check boundaries tracked bench bench-smoke package release clean

build: bin/fm kits

# fm carries the digest of the slim agent build made with it, and uses the
# fm-agent beside it only if it is that one.
bin/fm: bin/fm-agent FORCE
	$(GO) build -ldflags "$(LDFLAGS) -X main.agentSHA256=$$(sha256sum bin/fm-agent | cut -d' ' -f1)" -o bin/fm ./cmd/fm

# The slim agent build: fm dev's machines run it, fm server serves it to
# cloud machines (docs/agent.md).
bin/fm-agent: FORCE
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/fm-agent ./cmd/fm-agent

# The DSS stand-in kits, where fm dev looks for them (bin/kits beside bin/fm).
kits:
	$(GO) run ./deploy/standin/mkkit -out bin/kits

run: build
	./bin/fm dev

# The tests run the real NATS CLI (the operator recipes of the docs).
test: $(NATS)
	PATH="$(dir $(NATS)):$$PATH" $(GO) test $(TEST_FLAGS) ./...

$(NATS):
	$(GO) install github.com/nats-io/natscli/nats@$(NATSCLI_VERSION)

check: lint test

lint: tracked fmt-check vet staticcheck tidy-check boundaries

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './bin/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

$(STATICCHECK):
	$(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...

# go mod tidy must leave go.mod and go.sum as they are.
tidy-check:
	@cp go.mod /tmp/fm-go.mod.$$$$ && cp go.sum /tmp/fm-go.sum.$$$$ && \
	$(GO) mod tidy && \
	if ! cmp -s go.mod /tmp/fm-go.mod.$$$$ || ! cmp -s go.sum /tmp/fm-go.sum.$$$$; then \
		cp /tmp/fm-go.mod.$$$$ go.mod; cp /tmp/fm-go.sum.$$$$ go.sum; rm -f /tmp/fm-go.*.$$$$; \
		echo "go mod tidy changes go.mod or go.sum: run it and commit the result"; exit 1; \
	fi; rm -f /tmp/fm-go.*.$$$$

# The dependency direction of docs/architecture.md.
boundaries:
	@./.ci/check-imports

# No tracked file over 1 MiB, no tracked executable binary.
tracked:
	@./.ci/check-tracked

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# The benchmarks of issue 14 that make test does not run, once, at small
# scale, so that none rots: figures are printed, not asserted (CI runs this
# after make test; the fleet simulator runs there, as TestFleetSimulator).
bench-smoke:
	FM_BENCH_IDLE_SECONDS=5 $(GO) test -timeout 10m -run '^$$' -bench AgentIdle -benchtime 1x ./e2e/
	FM_BENCH_SNAPSHOT_RECENT=1 $(GO) test -timeout 10m -run '^$$' -bench LocalSnapshot -benchtime 1x ./provisioner/local/

# The fm package (.deb and .rpm) for this machine's architecture, with the
# binaries in it, in bin/packages (docs/install.md).
package:
	GO=$(GO) deploy/packaging/build.sh bin/packages $$($(GO) env GOARCH)

# A release: fm, fm-agent and nats-server for linux/amd64 and linux/arm64,
# their packages, and SHA256SUMS of them all, in bin/release. Reproducible:
# a release of one commit is the same bytes whoever makes it (TestPackage
# checks it; CHANGELOG.md says what each release changed).
release:
	rm -rf bin/release
	GO=$(GO) deploy/packaging/build.sh bin/release amd64 arm64
	cd bin/release && sha256sum linux-*/* *.deb *.rpm > SHA256SUMS
	@cat bin/release/SHA256SUMS

clean:
	rm -rf bin

FORCE:
