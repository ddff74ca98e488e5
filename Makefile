# tallyd — plain Makefile. `make help` lists the targets.
#
# Variants build into their own directories so they never mix objects:
#   build/        release (-O2 -g)
#   build/asan/   AddressSanitizer + UBSan
#   build/tsan/   ThreadSanitizer
# WERROR=1 turns warnings into errors (make test sets it).

CC       ?= cc
BUILD    ?= build
SAN      ?=
WERROR   ?=
OPT      ?= -O2
WARN      = -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
            -Wformat=2 -Wvla
# PORTABLE=1 builds the byte-at-a-time readers of decode.c and feature.c
# that big-endian hosts use, on any host (make test runs test_decode so).
PORTABLE ?=
CPPFLAGS += -Iinclude -Isrc -D_GNU_SOURCE $(if $(PORTABLE),-DTLY_PORTABLE,)
CFLAGS   ?=
CFLAGS   += -std=c11 $(OPT) -g $(WARN) -pthread $(SAN) $(if $(WERROR),-Werror,)
LDFLAGS  += -pthread $(SAN)
LDLIBS    = -lrdkafka -luv -lurcu-memb -lurcu-common -lyaml -lzstd -lmicrohttpd -lm
# Release builds compile the library for link-time optimisation too (fat
# objects: the code and the compiler's IR) and link tallyd and the
# benchmarks with it, which inlines across the library's files (the entity
# lookup-or-insert and its lock into the apply, the table's prefetches into
# the hints, the compact log's append into the store's apply): about 2 %
# fewer instructions an event on the ingest benchmark (bench/README.md).
# Tests link the objects' code as it is.
LTO       = $(if $(SAN),,-flto=auto -ffat-lto-objects)
# Release builds replace malloc process-wide with mimalloc (Debian's
# libmimalloc; bench/README.md has the figures). Sanitizer builds keep the
# libc allocator their runtimes wrap. --no-as-needed: nothing calls into the
# library by name except the INFO line that reports it.
ALLOC_DEF = $(if $(SAN),,-DTLY_MIMALLOC)
ALLOC_LIB = $(if $(SAN),,-Wl,--push-state,--no-as-needed -lmimalloc -Wl,--pop-state)

LIB_SRCS  = $(filter-out src/main.c,$(wildcard src/*.c))
LIB_OBJS  = $(patsubst src/%.c,$(BUILD)/obj/%.o,$(LIB_SRCS))
UNIT_SRCS = $(wildcard tests/unit/test_*.c)
UNIT_BINS = $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRCS))
ITEST_SRCS = $(wildcard tests/integration/*.c)
ITEST_BINS = $(patsubst tests/integration/%.c,$(BUILD)/itest/%,$(ITEST_SRCS))
FUZZ_SRCS  = $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS  = $(patsubst tests/fuzz/%.c,build/fuzz/%,$(FUZZ_SRCS))
FUZZ_SECONDS ?= 60
BENCH_SRCS = $(wildcard bench/*.c)
BENCH_BINS = $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_SRCS))
HEADERS   = $(wildcard include/tallyd/*.h src/*.h tests/unit/*.h bench/*.h)
# test_resp and test_decode include their fuzz targets' checks.
FUZZ_INCL = $(wildcard tests/fuzz/*.c)

.PHONY: all deps test unit tsan-test asan tsan bench demo fuzz format lint clean help

all: $(BUILD)/tallyd

help:
	@echo "make demo     install deps, build, run tallyd on its embedded demo"
	@echo "make test     install deps, build with -Werror, run every test"
	@echo "make deps     install the Debian packages (scripts/deps.sh)"
	@echo "make asan     build and run the unit tests under ASan+UBSan"
	@echo "make tsan     build and run the concurrent tests under TSan"
	@echo "make bench    benchmarks against peers (see bench/README.md)"
	@echo "make format   clang-format the sources;  make lint: cppcheck"

deps:
	@bash scripts/deps.sh

$(BUILD)/obj/%.o: src/%.c $(HEADERS) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(ALLOC_DEF) $(CFLAGS) $(LTO) -c $< -o $@

$(BUILD)/libtallyd.a: $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/tallyd: $(BUILD)/obj/main.o $(BUILD)/libtallyd.a
	$(CC) $(CFLAGS) $(LTO) $(LDFLAGS) -o $@ $^ $(ALLOC_LIB) $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libtallyd.a $(HEADERS) $(FUZZ_INCL)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libtallyd.a $(LDFLAGS) $(ALLOC_LIB) $(LDLIBS) -lcmocka

$(BUILD)/bench/%: bench/%.c $(BUILD)/libtallyd.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LTO) -o $@ $< $(BUILD)/libtallyd.a $(LDFLAGS) $(ALLOC_LIB) $(LDLIBS) -lhiredis

# Integration helpers in C (real clients, the mock-cluster producer).
$(BUILD)/itest/%: tests/integration/%.c $(BUILD)/libtallyd.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libtallyd.a $(LDFLAGS) $(ALLOC_LIB) $(LDLIBS) -lhiredis

# libFuzzer targets: clang, ASan+UBSan, the library sources compiled in.
build/fuzz/%: tests/fuzz/%.c $(LIB_SRCS) $(HEADERS)
	@mkdir -p $(dir $@)
	clang $(CPPFLAGS) -std=c11 -O1 -g -fsanitize=fuzzer,address,undefined -o $@ $< $(LIB_SRCS) \
	  -pthread $(LDLIBS)

unit-bins: $(BUILD)/tallyd $(UNIT_BINS) $(ITEST_BINS)

# The whole suite: build (release and TSan, -Werror), cppcheck, unit tests,
# the concurrent tests again under TSan (shorter model run), test_decode with
# the portable (big-endian) readers, a summary line.
test: deps
	@$(MAKE) --no-print-directory WERROR=1 unit-bins
	@$(MAKE) --no-print-directory WERROR=1 BUILD=build/tsan SAN=-fsanitize=thread OPT=-O1 unit-bins
	@$(MAKE) --no-print-directory WERROR=1 BUILD=build/portable PORTABLE=1 build/portable/tests/test_decode
	@$(MAKE) --no-print-directory lint
	@bash scripts/run-tests.sh

asan: deps
	@$(MAKE) --no-print-directory BUILD=build/asan SAN="-fsanitize=address,undefined -fno-omit-frame-pointer" OPT=-O1 unit-bins
	@UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 TLY_TEST_VARIANT=asan \
	  bash scripts/run-tests.sh build/asan

tsan: deps
	@$(MAKE) --no-print-directory BUILD=build/tsan SAN=-fsanitize=thread OPT=-O1 unit-bins
	@TLY_TEST_VARIANT=tsan bash scripts/run-tests.sh build/tsan

bench: deps
	@$(MAKE) --no-print-directory $(BUILD)/tallyd $(BENCH_BINS)
	@bash bench/run.sh

demo: deps all
	@$(BUILD)/tallyd --config config/demo.yaml

# Runs every fuzz target for FUZZ_SECONDS on a copy of its corpus (the corpus
# in the repo is replayed by the unit tests; new finds land in build/fuzz/).
# Undefined behaviour stops a run as a crash does (UBSan only reports by
# default); fuzz_store_load's inputs are state blocks, its seeds up to 13 KiB.
fuzz: deps $(FUZZ_BINS)
	@set -e; for f in $(FUZZ_BINS); do \
	  name=$$(basename $$f); c=tests/fuzz/corpus/$${name#fuzz_}; \
	  len=4096; if [ $$name = fuzz_store_load ]; then len=65536; fi; \
	  mkdir -p build/fuzz/corpus-$$name; \
	  echo "--- $$name ($(FUZZ_SECONDS) s)"; \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	    $$f -max_total_time=$(FUZZ_SECONDS) -max_len=$$len build/fuzz/corpus-$$name $$c; \
	done

format:
	clang-format-14 -i src/*.c src/*.h include/tallyd/*.h tests/unit/*.c tests/unit/*.h tests/integration/*.c tests/fuzz/*.c bench/*.c 2>/dev/null || true

lint:
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	  --inline-suppr --std=c11 -Iinclude -Isrc --suppress=missingIncludeSystem src

clean:
	rm -rf build
