#!/bin/sh
# mk-docker-opts.sh for hosts where fastlane replaced flanneld.
#
# Same name, flags and output as flannel's dist/mk-docker-opts.sh, so docker.service and
# flanneld.service drop-ins that call it (often as /usr/libexec/flannel/mk-docker-opts.sh or
# /opt/bin/mk-docker-opts.sh) keep working once flannel's package is removed. Install it at the
# path those units use. The work is done by `fastlane docker-opts`; $FASTLANE names the fastlane
# executable when it is not on systemd's PATH.
#
#   [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

fastlane=${FASTLANE:-}
if [ -z "$fastlane" ]; then
	fastlane=$(command -v fastlane 2>/dev/null)
fi
if [ -z "$fastlane" ]; then
	for candidate in /usr/local/bin/fastlane /usr/bin/fastlane /opt/fastlane/bin/fastlane; do
		if [ -x "$candidate" ]; then
			fastlane=$candidate
			break
		fi
	done
fi
if [ -z "$fastlane" ]; then
	echo "$0: fastlane not found (set FASTLANE=/path/to/fastlane)" >&2
	exit 1
fi
exec "$fastlane" docker-opts "$@"
