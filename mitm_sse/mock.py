"""mitmproxy script: answer requests from recorded streams (and record what is new, by mode).

mitmdump -s mitm_sse/mock.py [--set sse_dir=DIR] [--set sse_mode=replay|new|all] [--set sse_mock_speed=1]

The Recorder is loaded too, so `sse_mode=new` / `all` record with the same command; in `replay` mode it
records nothing (mocked and missed flows are marked as handled by the mock). See docs/mock.md.
"""

import sys
from pathlib import Path

try:
    from mitm_sse.contentview import SSEView
    from mitm_sse.mocker import Mock
    from mitm_sse.recorder import Recorder
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mitm_sse.contentview import SSEView
    from mitm_sse.mocker import Mock
    from mitm_sse.recorder import Recorder

_recorder = Recorder()
# SSEView last: it wraps whatever stream callable the others set, so mocked streams show in mitmweb too.
addons = [_recorder, Mock(_recorder), SSEView()]
