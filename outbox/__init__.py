"""outbox: a transactional outbox inside PostgreSQL for trading notifications.

Write a message in the same transaction as the business change::

    import outbox

    with psycopg.connect(url) as conn:
        conn.execute("UPDATE positions SET state = 'close_failed' WHERE id = %s", [pid])
        outbox.enqueue(conn, user_id="u42", channel="email",
                       template="position_failure_sl", vars={...})

Rollback means no message; commit means delivery, at least once. outbox never
begins, commits, rolls back or flushes the caller's transaction.
"""

# The one place the version is written: pyproject.toml reads it (setuptools dynamic
# version) and `outbox --version` prints it.
__version__ = "0.1.0"

from outbox._acknowledge import acknowledge, acknowledge_async
from outbox._campaign import CampaignResult, enqueue_campaign, enqueue_campaign_async
from outbox._cancel import cancel, cancel_async
from outbox._channels import (
    ChannelRecord,
    list_channels,
    register_channel,
    register_channel_async,
)
from outbox._enqueue import (
    MAX_VARS_BYTES,
    MAX_VARS_DEPTH,
    enqueue,
    enqueue_async,
    vars_depth_exceeds,
)
from outbox._errors import (
    ConfigurationError,
    InvalidMessage,
    MissingTemplateVariables,
    OutboxError,
    TemplateRenderError,
    UnknownTemplate,
)
from outbox._inbox import (
    InboxItem,
    inbox,
    inbox_async,
    read_all_inbox_items,
    read_all_inbox_items_async,
    read_inbox_item,
    read_inbox_item_async,
)
from outbox._migrate import version_location
from outbox._preferences import set_preference, set_preference_async
from outbox._recipients import (
    PushSubscriptionRecord,
    add_push_subscription,
    add_push_subscription_async,
    list_push_subscriptions,
    list_push_subscriptions_async,
    remove_push_subscription,
    remove_push_subscription_async,
    set_address,
    set_address_async,
    upsert_recipient,
    upsert_recipient_async,
)
from outbox._settings import Settings
from outbox._status import (
    AttemptRecord,
    MessageState,
    MessageStatus,
    message_status,
    message_status_async,
)

__all__ = [
    "MAX_VARS_BYTES",
    "MAX_VARS_DEPTH",
    "AttemptRecord",
    "CampaignResult",
    "ChannelRecord",
    "ConfigurationError",
    "InboxItem",
    "InvalidMessage",
    "MessageState",
    "MessageStatus",
    "MissingTemplateVariables",
    "OutboxError",
    "PushSubscriptionRecord",
    "Settings",
    "TemplateRenderError",
    "UnknownTemplate",
    "acknowledge",
    "acknowledge_async",
    "add_push_subscription",
    "add_push_subscription_async",
    "cancel",
    "cancel_async",
    "enqueue",
    "enqueue_async",
    "enqueue_campaign",
    "enqueue_campaign_async",
    "inbox",
    "inbox_async",
    "list_channels",
    "list_push_subscriptions",
    "list_push_subscriptions_async",
    "message_status",
    "message_status_async",
    "read_all_inbox_items",
    "read_all_inbox_items_async",
    "read_inbox_item",
    "read_inbox_item_async",
    "register_channel",
    "register_channel_async",
    "remove_push_subscription",
    "remove_push_subscription_async",
    "set_address",
    "set_address_async",
    "set_preference",
    "set_preference_async",
    "upsert_recipient",
    "upsert_recipient_async",
    "vars_depth_exceeds",
    "version_location",
]
