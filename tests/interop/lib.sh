# Shell helpers shared by the interop scripts (sourced, not run).

# A free loopback TCP port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Polls (5 s at most) until something accepts connections on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# start_sub OUT ARGS...: mosquitto_sub -d ARGS in the background, line-buffered into OUT;
# waits (10 s at most) for its SUBACK so a publish cannot race the subscription.
# Sets SUB_PID. Fails early if mosquitto_sub exits (e.g. a refused TLS handshake).
start_sub() {
  local out=$1; shift
  : >"$out"
  stdbuf -oL -eL mosquitto_sub -d "$@" >"$out" 2>&1 &
  SUB_PID=$!
  for _ in $(seq 1 200); do
    grep -q "received SUBACK" "$out" && return 0
    kill -0 "$SUB_PID" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Waits up to 10 s for a background process to exit; returns its status (124: killed).
wait_exit() {
  for _ in $(seq 1 200); do
    kill -0 "$1" 2>/dev/null || { wait "$1"; return $?; }
    sleep 0.05
  done
  kill "$1" 2>/dev/null
  return 124
}

# Message lines of mosquitto_sub -d output (its debug lines start with "Client " or
# "Subscribed (mid").
payload_lines() { grep -v -e '^Client ' -e '^Subscribed (mid' "$1" || true; }
