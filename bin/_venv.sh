# Sourced by bin/test, bin/demo, bin/bench and bin/docs: create or reuse <repo>/.venv, install this checkout with an extra.
# Reinstalls only when setup.cfg or pyproject.toml changed (a stamp file keeps their hash per extra), so re-runs are fast.
# Usage: ensure_venv <extra>     (sets VENV to the venv path)

ensure_venv() {
    local extra="$1"
    VENV="$REPO_ROOT/.venv"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.ztfd-installed-$extra"
    local want
    want="$(cat "$REPO_ROOT/setup.cfg" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "installing ztfd[$extra] into $VENV (first run takes a few minutes)" >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO_ROOT[$extra]" >&2
        echo "$want" > "$stamp"
    fi
}
