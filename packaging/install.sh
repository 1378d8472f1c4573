#!/bin/sh
# Install stagewatch on a Debian 12 host that runs dealspace.service, or remove it again.
#
#   packaging/install.sh [SOURCE]    install or upgrade; SOURCE is a checkout folder or a
#                                    wheel, by default the checkout this script belongs to
#   packaging/install.sh --uninstall remove the program, the units and the rules; keep the
#                                    data (state, snapshots, configuration, secret, keys)
#
# Running it again is harmless: users, folders and the venv are made only when missing, an
# existing configuration, secret or deploy key is never touched, and the agent is restarted
# on the newly installed code. docs/operations.md explains every choice made here.
#
# Environment: STAGEWATCH_PYTHON, the Python 3.11+ the venv is made from (/usr/bin/python3);
# DEALSPACE_GROUP, the group that may read the database (dealspace); pip's own PIP_*
# variables (PIP_INDEX_URL, PIP_FIND_LINKS, ...) reach pip unchanged.

set -eu

# The paths below are also written in the units, the rules and the sshd snippet next to this
# script; they match the defaults of the configuration.
VENV=/opt/stagewatch/venv
CHROOT=/opt/stagewatch/chroot
CONFIG_DIR=/etc/stagewatch
CONFIG=$CONFIG_DIR/stagewatch.toml
SECRET=$CONFIG_DIR/webhook-secret
DEPLOY_KEYS=$CONFIG_DIR/deploy_authorized_keys
STATE_DIR=/var/lib/stagewatch
STAGING_DIR=/opt/dealspace/staging
INSTALL_DIR=/opt/dealspace/bin
DATABASE=/opt/dealspace/data/dealspace.db
UNIT=stagewatch.service
MOUNT_UNIT=opt-stagewatch-chroot-opt-dealspace-staging.mount
UNIT_DIR=/etc/systemd/system
POLKIT_RULE=/etc/polkit-1/rules.d/50-stagewatch.rules
TMPFILES=/etc/tmpfiles.d/stagewatch.conf
SSHD_SNIPPET_DIR=/etc/ssh/sshd_config.d
SSHD_SNIPPET=$SSHD_SNIPPET_DIR/stagewatch-deploy.conf
COMMAND_LINK=/usr/local/bin/stagewatch

PYTHON=${STAGEWATCH_PYTHON:-/usr/bin/python3}
DEALSPACE_GROUP=${DEALSPACE_GROUP:-dealspace}

HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
CHECKOUT=$(dirname -- "$HERE")

say() {
    printf 'stagewatch install: %s\n' "$*"
}

warn() {
    printf 'stagewatch install: warning: %s\n' "$*" >&2
}

die() {
    printf 'stagewatch install: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,8s/^# \{0,1\}//p' "$0"
}

main() {
    case "${1:-}" in
        -h | --help)
            usage
            ;;
        --uninstall)
            [ "$#" -eq 1 ] || die "--uninstall takes no other argument"
            require_root
            uninstall
            ;;
        -*)
            die "unknown option $1 (see --help)"
            ;;
        *)
            [ "$#" -le 1 ] || die "give at most one SOURCE (see --help)"
            require_root
            install_all "${1:-$CHECKOUT}"
            ;;
    esac
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "run me as root (sudo $0)"
    command -v systemctl >/dev/null || die "systemctl not found: stagewatch is installed as a systemd service"
}

install_all() {
    source=$1
    [ -e "$source" ] || die "$source does not exist (give a checkout folder or a .whl file)"

    check_python
    make_users
    install_venv "$source"
    install_system_files
    install_configuration
    install_secret
    make_folders
    grant_database_access
    install_sshd_snippet

    systemctl daemon-reload
    systemctl enable --now "$MOUNT_UNIT"
    check_configuration
    systemctl enable "$UNIT"
    # restart, not start: an upgrade must run the code just installed. An agent stopped in the
    # middle of a deploy finishes or undoes it when it starts again.
    systemctl restart "$UNIT"

    say "installed $("$VENV/bin/stagewatch" --version)"
    say "webhook secret: $SECRET (give it to the build machine)"
    say "deploy key: add the build machine's public key to $DEPLOY_KEYS"
}

check_python() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "$PYTHON is not Python 3.11 or later (set STAGEWATCH_PYTHON)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON cannot make a venv: apt-get install python3-venv"
}

make_users() {
    # stagewatch runs the agent; deploy is the build machine's SFTP-only login. Neither is in
    # the other's group: deploy must not read the state or the snapshots, and stagewatch
    # reads the uploads through the staging folder's group instead.
    if ! getent passwd stagewatch >/dev/null; then
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "stagewatch deploy agent" stagewatch
        say "made the system user stagewatch"
    fi

    if ! getent passwd deploy >/dev/null; then
        useradd --system --user-group --home-dir "$STAGING_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "stagewatch uploads (SFTP only)" deploy
        say "made the system user deploy"
    fi
    # "*": no password can match, yet the account is not locked ("!"), which sshd would refuse
    # for key logins too when it runs without PAM (sshd_config(5) UsePAM).
    usermod --password '*' deploy
}

install_venv() {
    source=$1

    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
        warn "$VENV is broken (its Python is gone?): making it again"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p "$(dirname "$VENV")"
        chmod 0755 "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
        say "made the venv $VENV"
    fi

    build=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: the folder is known, and must go in any case
    trap "rm -rf '$build'" EXIT
    set -- --quiet --disable-pip-version-check --no-input

    if [ -d "$source" ]; then
        [ -f "$source/pyproject.toml" ] || die "$source has no pyproject.toml: not a stagewatch checkout"
        # Build from a copy: the checkout may be read-only, and pip would leave build/ and
        # *.egg-info behind in it.
        mkdir "$build/source"
        tar -C "$source" --exclude=./.git --exclude=./.venv --exclude=./build \
            --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
            --exclude=./.hypothesis \
            --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$build/source" -xf -
        "$VENV/bin/pip" wheel "$@" --no-deps --wheel-dir "$build/dist" "$build/source"
        wheel=$(find "$build/dist" -name 'stagewatch-*.whl')
        constraints=$source/constraints.txt
    else
        case "$source" in
            *.whl) ;;
            *) die "$source is neither a folder nor a .whl file" ;;
        esac
        wheel=$source
        constraints=$(dirname -- "$source")/constraints.txt
    fi

    # --force-reinstall --no-deps puts this very build in place even when its version number
    # did not change; the second call brings the dependencies to the pinned versions.
    set -- "$@" --root-user-action=ignore
    "$VENV/bin/pip" install "$@" --force-reinstall --no-deps "$wheel"
    if [ -f "$constraints" ]; then
        set -- "$@" --constraint "$constraints"
    fi
    "$VENV/bin/pip" install "$@" "$wheel"
    # The operator's `stagewatch` on PATH; a file of someone else's there is left alone.
    if [ -L "$COMMAND_LINK" ] || [ ! -e "$COMMAND_LINK" ]; then
        ln -sfn "$VENV/bin/stagewatch" "$COMMAND_LINK"
    fi
    say "installed stagewatch into $VENV"
}

install_system_files() {
    install -m 0644 "$HERE/systemd/$UNIT" "$UNIT_DIR/$UNIT"
    install -m 0644 "$HERE/systemd/$MOUNT_UNIT" "$UNIT_DIR/$MOUNT_UNIT"
    install -m 0644 "$HERE/tmpfiles.d/stagewatch.conf" "$TMPFILES"

    # polkitd(8) watches its rules folder and reads a new rule at once.
    [ -d "$(dirname "$POLKIT_RULE")" ] \
        || die "polkitd is not installed (apt-get install polkitd): it lets stagewatch restart dealspace.service"
    install -m 0644 "$HERE/polkit/50-stagewatch.rules" "$POLKIT_RULE"
}

install_configuration() {
    install -d -m 0755 "$CONFIG_DIR"

    if [ -e "$CONFIG" ]; then
        say "kept the configuration $CONFIG as it is"
    else
        # Group stagewatch reads it: the agent runs as that user.
        install -m 0640 -o root -g stagewatch "$CHECKOUT/etc/stagewatch.toml" "$CONFIG"
        say "installed the example configuration $CONFIG"
    fi

    if [ ! -e "$DEPLOY_KEYS" ]; then
        install -m 0644 "$HERE/sshd/deploy_authorized_keys.example" "$DEPLOY_KEYS"
    fi
}

install_secret() {
    if [ -e "$SECRET" ]; then
        return
    fi

    # 32 random bytes in the Standard Webhooks form whsec_<base64>: the decoded bytes are the
    # HMAC key of signed requests, the whole line is the X-Webhook-Secret value. Root-owned,
    # 0600: the unit gets it through LoadCredential=, nobody else reads it.
    previous_umask=$(umask)
    umask 077
    {
        printf 'whsec_'
        head -c 32 /dev/urandom | base64 -w 0
        printf '\n'
    } >"$SECRET.new"
    umask "$previous_umask"
    chown root:root "$SECRET.new"
    chmod 0600 "$SECRET.new"
    mv "$SECRET.new" "$SECRET"
    say "generated the webhook secret $SECRET"
}

make_folders() {
    systemd-tmpfiles --create "$TMPFILES"

    # The swap renames the verified copy over the live binary, so the agent writes this folder
    # (and only the agent: dealspace itself never needs to).
    install -d -m 0755 "$(dirname "$INSTALL_DIR")"
    install -d "$INSTALL_DIR"
    chgrp stagewatch "$INSTALL_DIR"
    chmod 0775 "$INSTALL_DIR"
}

grant_database_access() {
    # A snapshot reads the live WAL-mode database through a read-only connection. SQLite
    # needs its -wal and -shm to exist and be readable, or write access to the folder to make
    # them (https://www.sqlite.org/wal.html, "Read-Only Databases"); group read access to the
    # folder and the files, with dealspace holding them open, gives the first.
    if getent group "$DEALSPACE_GROUP" >/dev/null; then
        usermod --append --groups "$DEALSPACE_GROUP" stagewatch
    else
        warn "no group $DEALSPACE_GROUP: give stagewatch read access to $(dirname "$DATABASE") yourself"
        return
    fi

    if [ -e "$DATABASE" ] && ! as_stagewatch test -r "$DATABASE"; then
        warn "stagewatch cannot read $DATABASE: make its folder g+rx and its files g+r for group $DEALSPACE_GROUP (or give dealspace.service UMask=0027)"
    fi
}

as_stagewatch() {
    setpriv --reuid=stagewatch --regid=stagewatch --init-groups -- "$@"
}

install_sshd_snippet() {
    if [ ! -d "$SSHD_SNIPPET_DIR" ]; then
        warn "$SSHD_SNIPPET_DIR does not exist: set up the deploy user's SFTP access by hand (packaging/sshd/)"
        return
    fi

    install -m 0644 "$HERE/sshd/stagewatch-deploy.conf" "$SSHD_SNIPPET"
    if command -v sshd >/dev/null || [ -x /usr/sbin/sshd ]; then
        # sshd -t refuses to check anything without its privilege separation folder, which
        # ssh.service makes when it starts.
        [ -d /run/sshd ] || install -d -m 0755 /run/sshd
        if ! /usr/sbin/sshd -t; then
            rm -f "$SSHD_SNIPPET"
            die "sshd does not accept $SSHD_SNIPPET; removed it again"
        fi
    fi

    # A reload (SIGHUP) keeps every open session; a stopped sshd is left stopped.
    if systemctl is-active --quiet ssh.service; then
        systemctl reload ssh.service
        say "reloaded ssh.service"
    fi
}

check_configuration() {
    # check-config as the agent sees the host: user stagewatch with its groups, the secret
    # handed over as the unit's credential. Problems are reported, not fatal: on a new host
    # the database may not exist before dealspace first runs.
    if ! systemd-run --quiet --pipe --wait --collect \
        --property=User=stagewatch --property=Group=stagewatch \
        --property=LoadCredential="webhook-secret:$SECRET" \
        "$VENV/bin/stagewatch" --config "$CONFIG" check-config </dev/null; then
        warn "stagewatch check-config reported problems (above); fix them, then: systemctl restart $UNIT"
    fi
}

uninstall() {
    for unit in "$UNIT" "$MOUNT_UNIT"; do
        if [ -e "$UNIT_DIR/$unit" ]; then
            systemctl disable --now "$unit" || warn "could not stop $unit"
            rm -f "$UNIT_DIR/$unit"
        fi
    done
    systemctl daemon-reload

    rm -f "$POLKIT_RULE" "$TMPFILES"
    if [ -e "$SSHD_SNIPPET" ]; then
        rm -f "$SSHD_SNIPPET"
        if systemctl is-active --quiet ssh.service; then
            systemctl reload ssh.service
        fi
    fi

    if [ "$(readlink "$COMMAND_LINK" 2>/dev/null)" = "$VENV/bin/stagewatch" ]; then
        rm -f "$COMMAND_LINK"
    fi
    rm -rf "$VENV"
    for folder in "$CHROOT/opt/dealspace/staging" "$CHROOT/opt/dealspace" "$CHROOT/opt" \
        "$CHROOT" "$(dirname "$VENV")"; do
        rmdir "$folder" 2>/dev/null || true
    done

    say "removed the program, the units, the polkit rule and the sshd snippet"
    say "kept $CONFIG_DIR (configuration, secret, deploy key), $STATE_DIR (history, releases, snapshots), $STAGING_DIR and the users stagewatch and deploy"
}

main "$@"
