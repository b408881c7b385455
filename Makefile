# Builds the BPF objects that ship inside the package (meshlb/dataplane/bpf/).
# Kernel types come from the running kernel's BTF (CO-RE); the objects relocate
# against whatever kernel loads them, so they are built once.
CLANG    ?= clang
BPFTOOL  ?= bpftool
ARCH     := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
OUT      := meshlb/dataplane/bpf
BUILD    := build/bpf
VMLINUX  := $(BUILD)/vmlinux.h
SRCS     := $(wildcard bpf/*.bpf.c)
OBJS     := $(patsubst bpf/%.bpf.c,$(OUT)/%.bpf.o,$(SRCS))
HDRS     := $(wildcard bpf/*.h)
CFLAGS   := -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror -I$(BUILD) -Ibpf

.PHONY: all clean
all: $(OBJS)

$(VMLINUX):
	@mkdir -p $(BUILD)
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(OUT)/%.bpf.o: bpf/%.bpf.c $(HDRS) $(VMLINUX)
	@mkdir -p $(OUT)
	$(CLANG) $(CFLAGS) -c $< -o $@.tmp.o
	# strip DWARF but keep BTF: smaller objects, same CO-RE relocations
	llvm-strip -g $@.tmp.o -o $@ 2>/dev/null || mv $@.tmp.o $@
	@rm -f $@.tmp.o

clean:
	rm -rf $(BUILD) $(OUT)/*.bpf.o

.PHONY: test check
# The test command (README): builds the objects, checks the code, then every test;
# privileged tests need root and run (never skip) when CI=true.
test: all check
	python3 -m pytest -q -p no:cacheprovider tests

# Lint, types (strict where the code is pure: pyproject.toml) and the dependency rules
# of docs/architecture.md.
check:
	python3 -m ruff check meshlb tests bench setup.py
	python3 -m mypy meshlb
	lint-imports
