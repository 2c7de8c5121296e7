"""The dispatcher: claims messages under a lease and delivers them.

Run it with ``outbox dispatch``; embed it with::

    dispatcher = Dispatcher(Settings.from_env(), build_channels(settings))
    await dispatcher.run()
"""

from outbox.dispatcher._dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher._retry import RetryPolicy
from outbox.dispatcher.channels.base import Channel, Envelope, Outcome

__all__ = ["Channel", "Dispatcher", "DispatcherOptions", "Envelope", "Outcome", "RetryPolicy"]
