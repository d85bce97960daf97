# A process that spends its life inside execve(2): it re-executes itself COUNT times, then
# sleeps. While the kernel replaces its image, /proc/<pid>/environ reads empty for a moment.
#     sh reexec.sh COUNT [GOFILE]     (with GOFILE: wait for it to exist before starting)
if [ -n "$2" ]; then
  while [ ! -e "$2" ]; do sleep 0.02; done
fi
[ "$1" -gt 0 ] && exec /bin/sh "$0" $(($1 - 1))
exec sleep 600
