"""Running one command on a fleet of cmdserver daemons."""
