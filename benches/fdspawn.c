/* Micro-benchmark behind docs/benchmarks.md (D): what holding K close-on-exec fds per rank
 * costs posix_spawn. Not run by bench.py.
 *
 *   cc -O2 -o /tmp/fdspawn benches/fdspawn.c && /tmp/fdspawn 1024 3 1
 *   (N ranks of /bin/true, K fds kept open per rank, 1: addclosefrom_np(3) as dslaunch does)
 */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>
#include <sys/wait.h>
extern char **environ;
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc, char **argv){
  int n=atoi(argv[1]), fds_per=atoi(argv[2]), closefrom=atoi(argv[3]);
  char *cargv[]={"/bin/true",NULL};
  double t0=now(), spawn_total=0;
  for(int i=0;i<n;i++){
    posix_spawn_file_actions_t fa; posix_spawn_file_actions_init(&fa);
    int p[2]={-1,-1};
    if(fds_per){ pipe2(p,O_CLOEXEC); posix_spawn_file_actions_adddup2(&fa,p[1],1); posix_spawn_file_actions_adddup2(&fa,p[1],2);}
    if(closefrom) posix_spawn_file_actions_addclosefrom_np(&fa,3);
    pid_t pid; double s=now();
    posix_spawn(&pid,"/bin/true",&fa,NULL,cargv,environ);
    spawn_total+=now()-s;
    posix_spawn_file_actions_destroy(&fa);
    if(fds_per){ close(p[1]); for(int k=1;k<fds_per;k++) open("/dev/null",O_RDONLY|O_CLOEXEC);} /* keep read end + extra fds */
  }
  while(wait(NULL)>0);
  printf("n=%d fds/rank=%d closefrom=%d: total %.3f s, in posix_spawn %.3f s\n",n,fds_per,closefrom,now()-t0,spawn_total);
}
