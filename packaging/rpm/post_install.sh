# hydraflow %post ($1: 1 on install, 2 or more on upgrade): what %sysusers_create_compat,
# %tmpfiles_create, %systemd_post and a first-install enable + start would do.
systemd-sysusers hydraflow.conf || :
systemd-tmpfiles --create hydraflow.conf || :
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -eq 1 ]; then
        systemctl enable --now hydraflow-supervisor.socket hydraflow-supervisor.service || :
    else
        systemctl try-restart hydraflow-supervisor.service 'hydraflow@*.service' || :
    fi
fi
