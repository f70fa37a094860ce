#!/usr/bin/env bash
# The offline demo: the real Claude Code CLI talks to a local stand-in of the Anthropic API, so
# no Claude login is needed. The stand-in answers "echo: <your prompt>".
set -euo pipefail
cd "$(dirname "$0")/.."

CLAUDE_BIN=${CLAUDE_BIN:-.tools/claude/node_modules/.bin/claude}
STANDIN_PORT=${STANDIN_PORT:-8765}
PORT=${CCWRAP_PORT:-8204}
demo_home=$(mktemp -d -t ccwrap-demo-home.XXXXXX)  # keeps your ~/.claude out of the demo

.venv/bin/python -m ccwrap_trio.standin --host 127.0.0.1 --port "$STANDIN_PORT" &
standin_pid=$!
trap 'kill "$standin_pid" 2>/dev/null || true; rm -rf "$demo_home"' EXIT

cat <<TXT

  ccwrap-trio demo on http://127.0.0.1:$PORT (stand-in API on :$STANDIN_PORT). Try:

    curl -s http://127.0.0.1:$PORT/health | python3 -m json.tool
    curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model":"haiku","messages":[{"role":"user","content":"say hello"}]}'

  Ctrl-C stops it.

TXT

HOME=$demo_home \
ANTHROPIC_BASE_URL=http://127.0.0.1:$STANDIN_PORT \
ANTHROPIC_API_KEY=sk-standin-demo \
CCWRAP_FORWARD_API_KEY=1 \
CCWRAP_CLAUDE_BIN=$CLAUDE_BIN \
CCWRAP_PORT=$PORT \
  .venv/bin/ccwrap-trio serve "$@"
