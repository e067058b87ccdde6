"""Versions of the kvik distribution and of the plugin contract.

``PLUGIN_API_VERSION`` changes its major number only when a hook or interface
changes meaning; new optional hook arguments and new interface methods with
defaults bump the minor number. A plugin declares the range it supports with a
module attribute ``KVIK_PLUGIN_API = ">=1.0,<2"``.
"""

__version__ = "0.1.0"
# 1.1: QuantizationMethod.apply_with_bias; 1.2: structured-output backends hook;
# 1.3: ModelRunner.execute_async / supports_async_scheduling, ScheduledRequest.num_pending_*;
# 1.4: tool-parser and reasoning-parser hooks (served by kvik-server)
PLUGIN_API_VERSION = "1.4"
