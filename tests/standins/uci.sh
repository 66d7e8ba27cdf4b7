# The lab's stand-in for OpenWrt's /lib/config/uci.sh, the shell half of the uci package,
# which ../shared/openwrt does not have (its uci source's sh/uci.sh is an old copy of
# functions.sh, not this file). base-files' /lib/functions.sh sources it; `config_load`
# needs its `uci_load`, and init scripts call `uci_get`. Each function is a thin wrapper
# around the real `uci` command, written from what the functions are documented to do.
# For the tests only: never shipped.

# Load PACKAGE into the shell: `uci export` prints `package`, `config`, `option` and
# `list` lines, which functions.sh defines as shell functions (they record each value
# and call the callbacks); state values under /var/state are merged in.
uci_load() {
	local package="$1" exported status name
	_C=0
	if [ -z "$CONFIG_APPEND" ]; then
		for name in $CONFIG_LIST_STATE; do
			export ${NO_EXPORT:+-n} "CONFIG_${name}="
			export ${NO_EXPORT:+-n} "CONFIG_${name}_LENGTH="
		done
		export ${NO_EXPORT:+-n} CONFIG_LIST_STATE=
		export ${NO_EXPORT:+-n} CONFIG_SECTIONS=
		export ${NO_EXPORT:+-n} CONFIG_NUM_SECTIONS=0
		export ${NO_EXPORT:+-n} CONFIG_SECTION=
	fi
	exported="$(uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} ${LOAD_STATE:+-P /var/state} -S -n export "$package" 2>/dev/null)"
	status=$?
	if [ "$status" = 0 ] && [ -n "$exported" ]; then
		eval "$exported"
	fi
	# The last section's end, as functions.sh's callbacks expect.
	[ -z "$CONFIG_SECTION" ] || config_cb
	return "$status"
}

# The uci path of PACKAGE [SECTION [OPTION]].
_uci_path() {
	echo "$1${2:+.$2}${3:+.$3}"
}

# uci_get PACKAGE [SECTION [OPTION [DEFAULT]]]; also `uci_get package.section.option`.
uci_get() {
	local value
	value="$(uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q get "$(_uci_path "$1" "$2" "$3")")" ||
		value="$4"
	echo "${value:-$4}"
}

uci_get_state() {
	local value
	value="$(uci -P /var/state -q get "$(_uci_path "$1" "$2" "$3")")" || value="$4"
	echo "${value:-$4}"
}

uci_set() {
	uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q set "$(_uci_path "$1" "$2" "$3")=$4"
}

uci_add_list() {
	uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q add_list "$(_uci_path "$1" "$2" "$3")=$4"
}

uci_remove() {
	uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q delete "$(_uci_path "$1" "$2" "$3")"
}

uci_add() {
	if [ -n "$3" ]; then
		uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q set "$1.$3=$2"
		CONFIG_SECTION="$3"
	else
		CONFIG_SECTION="$(uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q add "$1" "$2")"
	fi
}

uci_commit() {
	uci ${UCI_CONFIG_DIR:+-c "$UCI_CONFIG_DIR"} -q commit ${1:+"$1"}
}

# State values (under /var/state, forgotten at reboot), as netifd's hotplug scripts keep.
uci_set_state() {
	[ -n "$3" ] || return 0
	uci -P /var/state -q set "$(_uci_path "$1" "$2" "$3")=$4"
}

uci_revert_state() {
	uci -P /var/state -q revert "$(_uci_path "$1" "$2" "$3")"
}

uci_toggle_state() {
	uci_revert_state "$1" "$2" "$3"
	uci_set_state "$1" "$2" "$3" "$4"
}
