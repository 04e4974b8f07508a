# hydraflow %preun ($1: 0 on removal, 1 on upgrade): on removal stop every worker instance and
# the supervisor and disable the supervisor (%systemd_preun); /var/lib/hydraflow stays.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop 'hydraflow@*.service' 'hydraflow@*.socket' hydraflow-supervisor.service hydraflow-supervisor.socket || :
    systemctl disable hydraflow-supervisor.service hydraflow-supervisor.socket || :
fi
