// The example's projects. "general" is seen by everyone in the org; "launch" is private to the
// token group `launch` (ticked at sign-in): its tasks, their events (the outbox row's audience)
// and who is viewing them reach that group only. Each project is an orgpulse topic, so a board
// streams just the project it shows.
export const PROJECTS = [
  { id: "general", name: "General", group: null },
  { id: "launch", name: "Launch", group: "launch" },
];

/** The projects `user` (token claims) may see. */
export const visibleProjects = (user) => PROJECTS.filter((p) => !p.group || (user.groups ?? []).includes(p.group));

/** Project `id` if `user` may see it, else undefined (a private project is "no such project"). */
export const visibleProject = (user, id) => visibleProjects(user).find((p) => p.id === id);

/** Who receives a change of a task of project `id`: the outbox row's `audience` (null = the org). */
export function audienceOf(id) {
  const group = PROJECTS.find((p) => p.id === id)?.group;
  return group ? { groups: [group] } : null;
}

/** The topic a project's task events carry (and its board subscribes to). */
export const topicOf = (id) => `project:${id}`;
