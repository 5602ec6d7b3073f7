# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install sshd clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgec demo

test: $(STAMP) sshd
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) .pytest_cache
