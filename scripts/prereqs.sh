# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/up.sh: installs what Keel needs on a fresh Debian
# machine (apt-get as root), or says exactly what is missing.

KEEL_APT_PACKAGES=(nats-server protobuf-compiler busybox-static)

keel_missing_packages() {
    local missing=()
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    [ -x /usr/bin/protoc ] || missing+=(protobuf-compiler)
    [ -x /bin/busybox ] || missing+=(busybox-static)
    echo "${missing[@]}"
}

keel_install_prereqs() {
    local missing
    missing=$(keel_missing_packages)
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "==> installing $missing (apt-get)"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            # shellcheck disable=SC2086
            apt-get install -y -qq --no-install-recommends $missing >/dev/null
        else
            echo "missing: $missing; install them with: sudo apt-get install $missing" >&2
            exit 1
        fi
    fi
    # Debian puts nats-server in /usr/sbin, which is not on every user's PATH.
    case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac
    export PROTOC=/usr/bin/protoc
    command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
}
