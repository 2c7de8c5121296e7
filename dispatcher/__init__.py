"""The dispatcher: claims messages under a lease and delivers them.

Run it with ``outbox dispatch``; embed it with::

    dispatcher = Dispatcher(Settings.from_env(), build_channels(settings))
    await dispatcher.run()
"""

from dispatcher._dispatcher import Dispatcher, DispatcherOptions
from dispatcher._retry import RetryPolicy
from dispatcher.channels.base import Channel, Envelope, Outcome

__all__ = ["Channel", "Dispatcher", "DispatcherOptions", "Envelope", "Outcome", "RetryPolicy"]
