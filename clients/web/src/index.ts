//! @orgpulse/client: the orgpulse SDK for browsers and Node. OrgpulseClient (typed calls for every
//! RPC, one shared exactly-once subscription per org, presence state and broadcasts), liveJobs,
//! the error helpers, and the generated protobuf-es messages and service descriptors.

export { OrgpulseClient, type OrgpulseClientOptions, type SubscribeOptions, type Unsubscribe } from "./client.js";
export type { ConnectionState, StateInfo, Timing } from "./feed.js";
export { backoffDelay, DEFAULT_TIMING } from "./feed.js";
export type { Handlers } from "./fanout.js";
export { kindOf } from "./fanout.js";
export { jobChange, listAllJobs, liveJobs, type LiveJobsHandlers, type LiveJobsOptions } from "./jobs.js";
export {
  PresenceHold, type AudienceSpec, type PresenceHandlers, type PresenceOptions, type PresenceWatchOptions,
} from "./presence.js";
export { snapshotThenSubscribe, type SnapshotHandlers } from "./snapshot.js";
export { ERROR_TRAILER, isNetworkError, isTokenExpired, markingFetch, NetworkError, UnauthorizedError } from "./errors.js";
export { claimsOf, type GetToken } from "./tokens.js";
export { Code, ConnectError } from "@connectrpc/connect";
export { create, fromBinary, toBinary } from "@bufbuild/protobuf";
export * from "./gen/orgpulse/v1/audience_pb.js";
export * from "./gen/orgpulse/v1/event_pb.js";
export * from "./gen/orgpulse/v1/job_pb.js";
export * from "./gen/orgpulse/v1/notification_pb.js";
