"""Exit codes the operator acts on (see the Job's podFailurePolicy).

0 success; PERMANENT (bad data, bad config: a retry cannot help, the Job fails at once);
RETRYABLE (anything else that went wrong, counted against backoffLimit);
a pod killed by a disruption is never counted.
"""

SUCCESS = 0
PERMANENT = 42
RETRYABLE = 43
# Where Kubernetes reads the container's termination message from.
TERMINATION_LOG = "/dev/termination-log"
