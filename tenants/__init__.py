"""Identity and access: users, organizations, members and roles, invitations, API keys, audit."""
