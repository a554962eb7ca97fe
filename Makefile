# Convenience targets; the scripts in scripts/ do the work.
.PHONY: all demo test build bench clean
all: build
build:
	scripts/build.sh
demo: build
	build/bin/kvshelf demo
test:
	scripts/test.sh
bench: build
	bench/store_bench.sh
clean:
	rm -rf build build-asan build-fuzz
