#!/usr/bin/env bash
# Starts, stops and checks the local single-node Kafka broker (KRaft) from the jars that `make jars` resolved.
#   infra/scripts/kafka.sh start|stop|status [STATE_DIR]
# STATE_DIR (default var/kafka) holds the config, the log directory, the PID file and the broker's output; tests
# pass their own so that a test broker never touches the demo's data. KAFKA_PORT (default 9092) and
# KAFKA_CONTROLLER_PORT (default 9093) choose the loopback ports.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cmd=${1:?usage: kafka.sh start|stop|status [STATE_DIR]}
state=$(realpath -m "${2:-$root/var/kafka}")
port=${KAFKA_PORT:-9092}
cport=${KAFKA_CONTROLLER_PORT:-9093}
jars="$root/.jars/kafka"
pidfile="$state/broker.pid"
java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
           -Dlog4j2.configurationFile="$root/infra/kafka/log4j2.yaml" -Dkafka.logs.dir="$state/logs")

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }


case "$cmd" in
  start)
    [ -d "$jars" ] || { echo "kafka.sh: $jars is missing; run 'make jars' first" >&2; exit 2; }
    if running; then echo "kafka already running (pid $(cat "$pidfile"), port $port)"; exit 0; fi
    mkdir -p "$state/data" "$state/logs"
    sed -e "s#@LOG_DIR@#$state/data#" -e "s#@BROKER_PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$cport#g" \
      "$root/infra/kafka/server.properties" > "$state/server.properties"
    if [ ! -f "$state/data/meta.properties" ]; then
      java -cp "$jars/*" "${java_opts[@]}" kafka.tools.StorageTool format --standalone \
        --cluster-id "$(java -cp "$jars/*" kafka.tools.StorageTool random-uuid)" \
        --config "$state/server.properties" >"$state/logs/format.out" 2>&1 ||
        { cat "$state/logs/format.out" >&2; exit 1; }
    fi
    nohup java -cp "$jars/*" "${java_opts[@]}" kafka.Kafka "$state/server.properties" \
      >"$state/logs/broker.out" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 120); do
      if ! running; then echo "kafka exited during start; see $state/logs/broker.out" >&2; tail -20 "$state/logs/broker.out" >&2; exit 1; fi
      if grep -q "Kafka Server started" "$state/logs/broker.out" 2>/dev/null; then
        echo "kafka started (pid $(cat "$pidfile"), 127.0.0.1:$port)"; exit 0
      fi
      sleep 0.5
    done
    echo "kafka did not answer within 60 s; see $state/logs/broker.out" >&2; exit 1 ;;
  stop)
    if running; then
      pid=$(cat "$pidfile"); kill "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      echo "kafka stopped"
    fi
    rm -f "$pidfile" ;;
  status)
    if running; then echo "running (pid $(cat "$pidfile"), port $port)"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: kafka.sh start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
