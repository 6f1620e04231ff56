// A page of the app: mounted into <main>, unmounted when the route changes.
export {};
