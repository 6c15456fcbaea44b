"""balloon-host: the hypervisor side of the balloon channel.

A thin asyncio shell (server, sessions, metrics, admin API) around the sans-IO
``shared.protocol.HostConnection``; per-guest page state lives in ``tracker`` and real
reclaim of a shared RAM file in ``reclaim``.
"""
