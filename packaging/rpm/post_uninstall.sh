# hydraflow %postun ($1: 0 on removal, 1 on upgrade): reload unit files (%systemd_postun).
# Restarts on upgrade happen in %post. RPM has no purge: /etc/hydraflow/hydraflow.toml is kept
# as .rpmsave when changed; repository state in /var/lib/hydraflow is never removed.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
