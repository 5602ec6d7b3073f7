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

# The device tests run the ssh path against a real OpenSSH sshd on loopback (Debian's openssh-server).
# Installed only when absent; as root (CI) through apt-get, otherwise through `sudo -n` if that needs no
# password; else the device tests skip and say why.
sshd:
	@test -x /usr/sbin/sshd || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "make: openssh-server is not installed and there is no root: the ssh device tests will skip"; exit 0; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends openssh-server </dev/null \
	    || echo "make: could not install openssh-server: the ssh device tests will skip"; }

# edgec's attention kernel for ExecuTorch on x86-64 (runtimes/executorch_attention.py) is compiled on first
# use by g++ (Debian's g++), installed like openssh-server above; without it the stock kernel runs and its
# tests skip and say why.
cxx:
	@command -v g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "make: g++ is not installed and there is no root: edgec's attention kernel tests will skip"; exit 0; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends g++ </dev/null \
	    || echo "make: could not install g++: edgec's attention kernel tests will skip"; }

# The emulated aarch64 device (edgec emulator, tests/test_emulator.py) needs qemu-user-static, binfmt-support,
# debootstrap and zstd, and root to mount binfmt_misc and chroot: installed like openssh-server above, else
# its tests skip and say why.
EMULATOR_TOOLS := /usr/bin/qemu-aarch64-static /usr/sbin/update-binfmts /usr/sbin/debootstrap /usr/bin/zstd
emulator-tools:
	@for tool in $(EMULATOR_TOOLS); do test -x $$tool || missing=1; done; [ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "make: qemu-user-static, binfmt-support, debootstrap or zstd is missing and there is no root: the emulator tests will skip"; exit 0; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends qemu-user-static binfmt-support debootstrap zstd </dev/null \
	    || echo "make: could not install the emulator's tools: the emulator tests will skip"; }

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
