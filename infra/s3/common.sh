# Shared settings for infra/s3/{up,down,status}; sourced, not run.
STATE=${SEERLIKE_S3_STATE:-/tmp/seerlike-s3}
PORT=${SEERLIKE_S3_PORT:-9000}
ENDPOINT=http://127.0.0.1:$PORT
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3 )}

server_pid() {  # pid of our server if it is alive
  [ -s "$STATE/moto.pid" ] || return 1
  local pid; pid=$(cat "$STATE/moto.pid")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

print_env() {
  echo "export AWS_ENDPOINT_URL=$ENDPOINT"
  echo "export AWS_ACCESS_KEY_ID=testing"
  echo "export AWS_SECRET_ACCESS_KEY=testing"
  echo "export AWS_DEFAULT_REGION=us-east-1"
}
