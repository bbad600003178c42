# Sourced by bin/test, bin/demo, bin/bench, bin/docs and bin/update-pins: create or reuse a venv and install this checkout
# with an extra, every package at the version constraints.txt pins (the set CI last passed with; see
# docs/maintenance.md). Reinstalls only when setup.cfg, pyproject.toml or the constraints changed (a stamp file keeps
# their hash per extra), so re-runs are fast.
# Usage: ensure_venv <extra>     (sets VENV to the venv path)
#   ZTFD_VENV         the venv (default <repo>/.venv)
#   ZTFD_CONSTRAINTS  the constraints file (default <repo>/constraints.txt); set but empty: no constraints, the newest
#                     releases (bin/update-pins resolves them so)

ensure_venv() {
    local extra="$1"
    VENV="${ZTFD_VENV:-$REPO_ROOT/.venv}"
    local constraints="${ZTFD_CONSTRAINTS-$REPO_ROOT/constraints.txt}"
    local pinned=() build_pinned=()
    if [[ -n "$constraints" ]]; then
        [[ -f "$constraints" ]] || { echo "ensure_venv: no constraints file $constraints" >&2; return 1; }
        pinned=(-c "$constraints")
        # setuptools and wheel in pip's isolated build of this checkout are pinned too (needs pip >= 25.3).
        build_pinned=(--build-constraint "$constraints")
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.ztfd-installed-$extra"
    local want
    want="$({ cat "$REPO_ROOT/setup.cfg" "$REPO_ROOT/pyproject.toml"; if [[ -n "$constraints" ]]; then
        cat "$constraints"; else echo "newest releases"; fi; } | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "installing ztfd[$extra] into $VENV (first run takes a few minutes)" >&2
        # pip itself first (the pinned one: --build-constraint needs pip >= 25.3), with the build tools.
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade \
            "${pinned[@]}" pip setuptools wheel >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pinned[@]}" "${build_pinned[@]}" \
            -e "$REPO_ROOT[$extra]" >&2
        echo "$want" > "$stamp"
    fi
}
