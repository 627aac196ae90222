/* The two libsystemd functions libdbus-1.a calls, for the static build only (see build.rs):
 * the answers of a process that was not socket-activated. vswitchd links libpcap for its
 * filter compiler and never opens a D-Bus connection, so neither is ever called. */
int sd_listen_fds(int unset_environment) {
    (void)unset_environment;
    return 0;
}

int sd_is_socket(int fd, int family, int type, int listening) {
    (void)fd;
    (void)family;
    (void)type;
    (void)listening;
    return 0;
}
