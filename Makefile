# make        build dist/sgm (one executable, bun build --compile)
# make test   install what is missing, then run every test
# make demo   install what is missing, then evict a demo VM and print the report
# make soak   the Linux-guest eviction RUNS times (default 40) over a matrix, LOSS_RUNS times (default 20)
#             with a relay killed at a random moment, RESUME_RUNS times (default 10) with the gather
#             killed after eviction and resumed, then the fuzz tests for FUZZ_SECONDS each
#             (default 60); not part of make test
# make bench  the paper's experiment on a bed of hosts (network namespaces, root): table, JSON and
#             PNG into bench-results/; BENCH_ARGS passes flags (see test/benchmarks/paper.bench.ts)

BUN := node_modules/.bin/bun
VERSION := $(shell node -p "require('./package.json').version")+$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
SOURCES := $(shell find cli core -name '*.ts')
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps system-deps test demo soak bench typecheck clean

all: dist/sgm

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	$(BUN) --version >/dev/null
	touch $@

deps: node_modules/.installed system-deps

# Debian packages the tests and the demo need: QEMU 7.2, and iproute2 for
# the network-namespace hosts of the relay tests.
system-deps:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# BLAKE3 of sixteen pages at a time (AVX-512), and a socket read into
# sgm's own buffer, and socket writes on a thread of their own; dist/sgm
# embeds all three
NATIVE := native/page-digest.so native/socket-receive.so native/socket-send.so
native/%.so: native/%.c
	gcc -O3 -shared -fPIC -Wall -Wextra -Werror -o $@ $<

# --bytecode: a bytecode cache in the executable, a third less CPU to start
# each process (docs/cost-history.md, "Starting a process")
dist/sgm: node_modules/.installed $(SOURCES) $(NATIVE)
	$(BUN) build --compile --bytecode --format=esm --minify-syntax --define 'SGM_VERSION="$(VERSION)"' cli/main.ts core/dedup/digest-worker.ts --outfile $@

typecheck: node_modules/.installed
	node_modules/.bin/tsc -p .

# The test files run two at a time: most of the suite waits on guests and
# on links held to a rate, so two files share the 2 cores well (368 tests in
# 457 and 467 s so, 684 s one file at a time). The fixtures come first,
# fetched once.
# A failure's reason is printed again at the end, where a log's tail shows it.
test: deps dist/sgm typecheck
	mkdir -p .cache && rm -f .cache/junit.xml
	$(BUN) test/harness/fixtures.ts
	SGM_TEST_SCRIBBLE=1 $(BUN) test --parallel=2 --timeout 600000 --reporter=junit --reporter-outfile=.cache/junit.xml || { $(BUN) test/harness/failures.ts .cache/junit.xml; exit 1; }

demo: deps dist/sgm
	$(BUN) demo/demo.ts

RUNS ?= 40
LOSS_RUNS ?= 20
RESUME_RUNS ?= 10
FUZZ_SECONDS ?= 60
soak: deps dist/sgm
	SGM_TEST_SCRIBBLE=1 $(BUN) test/soak/linux-eviction.soak.ts $(RUNS) $(LOSS_RUNS) $(RESUME_RUNS)
	SGM_TEST_SCRIBBLE=1 SGM_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BUN) test --timeout 3600000 test/fuzz.test.ts

BENCH_ARGS ?=
bench: deps dist/sgm
	mkdir -p bench-results
	$(BUN) test/benchmarks/paper.bench.ts --markdown bench-results/bench.md --json bench-results/bench.json --png bench-results/bench.png $(BENCH_ARGS)

clean:
	rm -rf dist .cache bench-results native/*.so
