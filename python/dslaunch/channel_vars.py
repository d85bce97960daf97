"""How a multi-node runner hands its per-node launchers the job channel (`jobchannel`).

Kept apart from `jobchannel` so that a launcher can see it runs under no runner, as every
single-node job does, without loading the channel's sockets and threads (4 ms of a start).
"""

#: ``host:port`` of the runner's job server.
REPORT_TO_ENV = 'DSLAUNCH_REPORT_TO'
#: The job's random token; a connection without it is dropped.
TOKEN_ENV = 'DSLAUNCH_JOB_TOKEN'
