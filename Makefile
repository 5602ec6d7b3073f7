# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install sshd cxx emulator-tools emulator-root android-core-test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgec demo

# Two workers, each taking whole test files: most of the suite's time is single-threaded Python (torch.export
# tracing, ExecuTorch lowering), so two files at once halve the wall time on two cores (25 -> 14 minutes on a
# 2-vCPU Xeon). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP) sshd emulator-root cxx
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The emulator's root is built once (minutes) and cached under ~/.cache/edgec; the tests then restore it.
emulator-root: $(STAMP) emulator-tools
	@if [ "$$(id -u)" = 0 ] && [ -x /usr/sbin/debootstrap ]; then $(BIN)/edgec emulator build \
	  || echo "make: could not build the emulator's root: the emulator tests will skip"; fi

# Debian packages the tests need, installed only when absent: as root (CI) through apt-get, otherwise through
# `sudo -n` if that needs no password; else, or when apt-get fails, the tests that need them skip and say why.
# $(call apt_install,PACKAGES,WHAT SKIPS), after a check for the packages' files in the recipe.
apt_install = if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
  echo "make: $(1) missing and no root to install it: $(2) will skip"; exit 0; fi; \
  export DEBIAN_FRONTEND=noninteractive; \
  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends $(1) </dev/null \
  || echo "make: could not install $(1): $(2) will skip"

# The device tests run the ssh path against a real OpenSSH sshd on loopback (Debian's openssh-server).
sshd:
	@test -x /usr/sbin/sshd || { $(call apt_install,openssh-server,the ssh device tests); }

# edgec's kernels for ExecuTorch on x86-64 (runtimes/executorch_kernels.py) are compiled on first use by
# g++; without it the stock kernels run.
cxx:
	@command -v g++ >/dev/null || { $(call apt_install,g++,the ExecuTorch kernel tests); }

# The emulated aarch64 device (edgec emulator, tests/test_emulator.py) needs qemu-user-static, binfmt-support,
# debootstrap and zstd, and root to mount binfmt_misc and chroot.
EMULATOR_TOOLS := /usr/bin/qemu-aarch64-static /usr/sbin/update-binfmts /usr/sbin/debootstrap /usr/bin/zstd
emulator-tools:
	@for tool in $(EMULATOR_TOOLS); do test -x $$tool || missing=1; done; [ -z "$$missing" ] \
	  || { $(call apt_install,qemu-user-static binfmt-support debootstrap zstd,the emulator tests); }

# android-demo/core, the app's testable logic, compiled by the npm registry's kotlinc (cached under
# ~/.cache/edgec/kotlin) and run under JUnit 5's console launcher (Debian's junit5) on this JVM: no Gradle,
# no Android SDK, no Maven Central. EDGEC_ANDROID_VECTORS=DIR points its tests at vectors written by
# edgec (tests/test_android_core.py writes them and calls this target); without it those tests skip.
KOTLIN_VERSION := 2.4.20
KOTLIN_HOME := $(HOME)/.cache/edgec/kotlin/node_modules/kotlin-compiler
KOTLINC := $(KOTLIN_HOME)/bin/kotlinc
JUNIT_JAR := /usr/share/java/junit-platform-console-standalone.jar
CORE := android-demo/core
CORE_CLASSES := $(CORE)/build/host/classes
CORE_SOURCES := $(shell find $(CORE)/src -name '*.kt' 2>/dev/null)

$(KOTLINC):
	npm install --prefix $(HOME)/.cache/edgec/kotlin --no-save --no-audit --no-fund --loglevel=error kotlin-compiler@$(KOTLIN_VERSION)

$(JUNIT_JAR):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "make: $(JUNIT_JAR) is missing: install Debian's junit5 (apt-get install junit5)"; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q --no-install-recommends junit5 </dev/null \
	  || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends junit5 </dev/null; }

# Main and test sources in one kotlinc run: the compiler's start-up is most of its time.
$(CORE_CLASSES)/.stamp: $(CORE_SOURCES) | $(KOTLINC) $(JUNIT_JAR)
	rm -rf $(CORE_CLASSES)
	$(KOTLINC) -jvm-target 17 -nowarn -cp $(JUNIT_JAR) -d $(CORE_CLASSES) $(CORE_SOURCES)
	touch $@

android-core-test: $(CORE_CLASSES)/.stamp
	java -jar $(JUNIT_JAR) --disable-banner --disable-ansi-colors --fail-if-no-tests --details=tree \
	  --class-path $(CORE_CLASSES):$(KOTLIN_HOME)/lib/kotlin-stdlib.jar --select-package org.edgec.core

clean:
	rm -rf $(VENV) .pytest_cache
