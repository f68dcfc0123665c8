# pyvhost: build, test, demo. Every target installs what it needs (Debian packages included).
PYTHON ?= python3
DEB_PACKAGES = qemu-system-x86 linux-image-amd64 busybox-static cpio dpdk-dev \
	librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23 \
	iproute2 iputils-ping ethtool iperf3 tcpdump tshark libcap2-bin libxdp-dev libbpf-dev prometheus \
	openvswitch-common

.PHONY: all deps debs build test test-fast lint demo bench clean fuzz asan-test

all: build

debs:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

deps: debs
	$(PYTHON) -m pip install -q "Cython>=3.0" "setuptools>=65" wheel "pytest>=7.4" "hypothesis>=6.80" "ruff>=0.4" \
		"prometheus_client>=0.17" "matplotlib>=3.6"

build: deps
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

lint:
	$(PYTHON) -m ruff check pyvhost tests bench

test: build
	$(PYTHON) -m ruff check pyvhost tests bench
	$(PYTHON) -m pytest -ra tests

test-fast: build
	$(PYTHON) -m pytest -ra -m "not slow" tests

# the fuzzers for longer (PYVHOST_FUZZ_SCALE times the make-test examples; or set
# PYVHOST_FUZZ_EXAMPLES for an absolute number per fuzzer)
FUZZ_SCALE ?= 20
FUZZ_TESTS = tests/test_fuzz_rings.py tests/test_fuzz_onecopy.py tests/test_vring_hostile.py \
	tests/test_backend_messages.py tests/test_fuzz_messages.py tests/test_protocol.py \
	tests/test_memory.py tests/test_tunnel_decap.py
fuzz: build
	PYVHOST_FUZZ_SCALE=$(FUZZ_SCALE) $(PYTHON) -m pytest -ra -s $(FUZZ_TESTS)

# the compiled modules built with ASan + UBSan (in /tmp/pyvhost-asan-<hash>), the fuzz and
# hostile tests run under them; any sanitizer report fails
asan-test: deps
	PYVHOST_FUZZ_SCALE=$${PYVHOST_FUZZ_SCALE:-3} $(PYTHON) -m tests.harness.asan -ra -s $(FUZZ_TESTS) \
		tests/test_cve_regressions.py tests/test_classifier.py

demo: build
	$(PYTHON) -m pyvhost.cli.main demo

# OVS-DPDK (it brings openvswitch-switch, whose plain ovs-vswitchd bench host uses) is only
# a benchmark peer (bench flows, openflow, host, guest), so it is installed here, not by debs
bench: build
	dpkg -s openvswitch-switch-dpdk >/dev/null 2>&1 || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		openvswitch-switch-dpdk)
	for b in backend frontend switch flows openflow host guest tunnel; do $(PYTHON) -m pyvhost.cli.main bench $$b || exit 1; done

clean:
	rm -rf build *.egg-info pyvhost/*.so pyvhost/_*.c
